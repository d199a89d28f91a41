"""The run-config schema: every key a config file may set, with defaults, and its validation.

Config files (``configs/*.py``) start from :func:`base_config` and change values; they may not invent
keys. :func:`validate` checks the whole config (unknown keys, types, impossible sizes, a missing
dataset) and raises :class:`ConfigError` naming the key, before anything is compiled.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
import numpy as np
from ml_collections import config_dict

from ditjax.data.config import default_data_config
from ditjax.models import ARCHS, DiTConfig, dit_config

OBJECTIVES = ("ddpm", "flow")
SAMPLERS = ("ddpm", "ddim", "euler", "heun", "euler_maruyama")
MESH_AXES = ("data", "fsdp", "tensor", "expert")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    model = {k: v for k, v in dataclasses.asdict(DiTConfig()).items()}
    model["attn_scale"] = config_dict.placeholder(float)
    c.model = ml_collections.ConfigDict(model)

    c.objective = ml_collections.ConfigDict(dict(
        name="ddpm",             # 'ddpm' (DiT ε + learned Σ hybrid loss) | 'flow' (SiT/REPA velocity)
        num_timesteps=1000,      # ddpm
        beta_schedule="linear",  # ddpm: 'linear' | 'squaredcos_cap_v2'
        convention="sit",        # flow: 'sit' (noise at t=0) | 'repa' (noise at t=1)
        time_sampling="uniform", # flow: 'uniform' | 'logit_normal'
        logit_mean=0.0,
        logit_std=1.0,
        time_scale=1.0,          # flow: the model sees t·time_scale (1 for SiT/REPA parity)
    ))
    c.data = default_data_config()
    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-4, schedule="constant", warmup_steps=0, end_lr=0.0,
        b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip=0.0,
    ))
    c.train = ml_collections.ConfigDict(dict(
        global_batch_size=256,
        num_steps=400_000,
        grad_accum_steps=1,
        ema_decay=0.9999,
        ema_warmup=False,        # decay min(decay, (1+n)/(10+n)), useful for short runs
        log_every=100,
        checkpoint_every=10_000,
        keep_last=2,
        keep_every=0,            # also keep every M-th step's checkpoint (0: none)
        async_checkpoint=True,
        sample_every=0,          # EMA sample grid every N steps (0: only at the end)
        eval_at_end=True,        # bundled digits: class accuracy + Fréchet distance → eval.json
        nan_guard=True,
    ))
    c.sample = ml_collections.ConfigDict(dict(
        sampler="ddpm", steps=250, cfg_scale=1.5,
        cfg_channels=0,          # 0: guide all channels; 3: DiT's legacy first-3-channel rule
        guidance_low=0.0, guidance_high=1.0,
        eta=0.0,                 # ddim
        grid_per_class=8,        # sample grid: rows = classes shown, columns = samples per class
        grid_classes=10,
        eval_samples=500,
        batch_size=250,
    ))
    c.mesh = ml_collections.ConfigDict(dict(
        data=-1, fsdp=1, tensor=1, expert=1,                 # in-slice (ICI) sizes; -1 fills the rest
        dcn_data=1, dcn_fsdp=1, dcn_tensor=1, dcn_expert=1,  # across slices (DCN)
        rules="dp",              # 'dp' | 'fsdp' | 'fsdp_tp' (see ditjax.parallel.rules)
        custom_rules="",         # rules placed before the preset, e.g. "adaln=tensor,vocab=fsdp" (docs/scaling.md)
    ))
    c.mup = ml_collections.ConfigDict(dict(  # docs/mup.md
        parametrization="sp",    # 'sp' (reference DiT) | 'mup' (init, lr/wd multipliers, readout by width)
        base_hidden_size=config_dict.placeholder(int),  # mup: the width the multipliers are relative to
        base_num_heads=config_dict.placeholder(int),
        output_mult=1.0,         # mup: readout multiplier at the base width (output_mult/m at width m·base)
        attn_scale="sqrt",       # mup: 'sqrt' (1/√d_h) | 'mup' (√d_base/d_h, only matters if d_h grows)
    ))
    return c


def set_arch(model: ml_collections.ConfigDict, arch: str) -> None:
    """Fill depth/width/heads/patch of a named architecture into ``config.model``."""
    cfg = dit_config(arch)
    for key in ("depth", "hidden_size", "num_heads", "patch_size"):
        model[key] = getattr(cfg, key)


def model_config(config: ml_collections.ConfigDict) -> DiTConfig:
    return DiTConfig(**config.model.to_dict())


def _check_schema(config: Any, schema: Any, prefix: str) -> None:
    for key in config.keys():
        name = f"{prefix}{key}"
        if key not in schema:
            raise ConfigError(f"unknown config key {name!r}; known keys here: {sorted(schema.keys())}")
        value, expected = config[key], schema[key]
        if isinstance(expected, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise ConfigError(f"config key {name!r} must be a section, got {type(value).__name__}")
            _check_schema(value, expected, name + ".")
            continue
        field = schema.get_type(key) if hasattr(schema, "get_type") else type(expected)
        if value is None or field is type(None):
            continue
        ok = isinstance(value, field) or (field is float and isinstance(value, int) and not isinstance(value, bool))
        if field is int and isinstance(value, bool) or field is bool and not isinstance(value, bool):
            ok = False
        if not ok:
            raise ConfigError(f"config key {name!r} must be {field.__name__}, got {value!r} ({type(value).__name__})")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(config: ml_collections.ConfigDict, *, num_devices: int, num_processes: int = 1,
             check_data: bool = True) -> None:
    """Raise ConfigError on the first problem, naming the key."""
    _check_schema(config, base_config(), "")
    try:
        model_config(config).validate()
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from None
    o, opt, tr, s, m = config.objective, config.optim, config.train, config.sample, config.mesh
    _require(o.name in OBJECTIVES, f"objective.name={o.name!r} not in {OBJECTIVES}")
    _require(o.convention in ("sit", "repa"), f"objective.convention={o.convention!r} not in ('sit', 'repa')")
    _require(o.time_sampling in ("uniform", "logit_normal"),
             f"objective.time_sampling={o.time_sampling!r} not in ('uniform', 'logit_normal')")
    _require(o.num_timesteps > 0, f"objective.num_timesteps={o.num_timesteps} must be positive")
    _require(opt.lr > 0, f"optim.lr={opt.lr} must be positive")
    _require(opt.end_lr >= 0, f"optim.end_lr={opt.end_lr} must be ≥ 0")
    _require(opt.warmup_steps >= 0, f"optim.warmup_steps={opt.warmup_steps} must be ≥ 0")
    _require(0 <= opt.b1 < 1 and 0 <= opt.b2 < 1, f"optim.b1/b2=({opt.b1}, {opt.b2}) must lie in [0, 1)")
    _require(opt.weight_decay >= 0 and opt.grad_clip >= 0, "optim.weight_decay and optim.grad_clip must be ≥ 0")
    from ditjax.train.optim import SCHEDULES
    _require(opt.schedule in SCHEDULES, f"optim.schedule={opt.schedule!r} not in {SCHEDULES}")
    _require(tr.num_steps > 0, f"train.num_steps={tr.num_steps} must be positive")
    _require(tr.global_batch_size > 0, f"train.global_batch_size={tr.global_batch_size} must be positive")
    _require(tr.grad_accum_steps > 0, f"train.grad_accum_steps={tr.grad_accum_steps} must be positive")
    micro = tr.global_batch_size // tr.grad_accum_steps
    _require(tr.global_batch_size % tr.grad_accum_steps == 0,
             f"train.global_batch_size={tr.global_batch_size} is not divisible by "
             f"train.grad_accum_steps={tr.grad_accum_steps}")
    batch_devices = _batch_parallelism(m, num_devices)
    _require(micro % batch_devices == 0,
             f"train.global_batch_size={tr.global_batch_size} (micro-batch {micro}) is not divisible by the "
             f"{batch_devices} devices it is split over (mesh data×fsdp×expert); change the batch or the mesh")
    _require(tr.global_batch_size % num_processes == 0,
             f"train.global_batch_size={tr.global_batch_size} is not divisible by {num_processes} processes")
    _require(0 <= tr.ema_decay <= 1, f"train.ema_decay={tr.ema_decay} must lie in [0, 1]")
    for key in ("log_every", "checkpoint_every", "keep_last"):
        _require(tr[key] > 0, f"train.{key}={tr[key]} must be positive")
    _require(s.sampler in SAMPLERS, f"sample.sampler={s.sampler!r} not in {SAMPLERS}")
    _require((s.sampler in ("ddpm", "ddim")) == (o.name == "ddpm"),
             f"sample.sampler={s.sampler!r} does not fit objective.name={o.name!r}: DDPM objectives use "
             "'ddpm'/'ddim', flow objectives 'euler'/'heun'/'euler_maruyama'")
    _require(s.steps > 0, f"sample.steps={s.steps} must be positive")
    _require(s.cfg_channels >= 0, f"sample.cfg_channels={s.cfg_channels} must be ≥ 0 (0 means all)")
    from ditjax.parallel.rules import rules_from_config
    try:
        rules_from_config(m)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    mu = config.mup
    _require(mu.parametrization in ("sp", "mup"), f"mup.parametrization={mu.parametrization!r} not in ('sp', 'mup')")
    _require(mu.attn_scale in ("sqrt", "mup"), f"mup.attn_scale={mu.attn_scale!r} not in ('sqrt', 'mup')")
    if mu.parametrization == "mup":
        base_d, base_h = mu.base_hidden_size or 0, mu.base_num_heads or 0
        _require(base_d > 0 and base_h > 0 and base_d % base_h == 0,
                 f"mup.base_hidden_size={mu.base_hidden_size} / mup.base_num_heads={mu.base_num_heads} must be "
                 "positive with the width divisible by the heads (the base model's shape)")
        _require(mu.output_mult > 0, f"mup.output_mult={mu.output_mult} must be positive")
        _require(config.model.readout_scale == 1.0 and (config.model.attn_scale is None or mu.attn_scale == "sqrt"),
                 "mup sets model.readout_scale (and model.attn_scale with mup.attn_scale='mup'); leave them unset")
    if check_data:
        from ditjax.data.pipeline import dataset_info
        try:
            info = dataset_info(config.data)
        except FileNotFoundError as err:
            raise ConfigError(f"data: {err}") from None
        mc = config.model
        model_shape = (mc.input_size, mc.input_size, mc.in_channels)
        _require(tuple(info.image_shape) == model_shape,
                 f"the data yield {tuple(info.image_shape)} (HWC) but model.input_size/in_channels expect "
                 f"{model_shape}; set model.input_size and model.in_channels to match the data")
        _require(info.num_classes == mc.num_classes,
                 f"the data have {info.num_classes} classes but model.num_classes={mc.num_classes}")
        if config.data.cache_decoded:
            _check_decoded_cache_fits(config.data, info)


def _check_decoded_cache_fits(data: ml_collections.ConfigDict, info: Any) -> None:
    import psutil

    _require(data.name != "latents", "data.cache_decoded applies to image datasets (digits, tfds), not latents")
    need = info.num_examples * int(np.prod(info.image_shape))
    free = psutil.virtual_memory().available
    _require(need <= free / 2, f"data.cache_decoded=True would hold {need / 2**30:.1f} GiB of decoded images, over "
             f"half of the {free / 2**30:.1f} GiB free; set data.cache_decoded=False to read from disk")


def _batch_parallelism(m: ml_collections.ConfigDict, num_devices: int) -> int:
    from ditjax.parallel.mesh import mesh_shape
    try:
        shape = mesh_shape(m, num_devices)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return shape["data"] * shape["fsdp"] * shape["expert"]


__all__ = ["ARCHS", "ConfigError", "base_config", "model_config", "set_arch", "validate"]
