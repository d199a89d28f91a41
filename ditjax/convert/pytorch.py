"""PyTorch DiT/SiT weight files ↔ ditjax checkpoint directories.

Everything that can go wrong with the input (file format, keys, shapes, pos_embed, config) is checked
in NumPy before JAX computes anything or Orbax is imported, so a bad file fails in well under a second.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from ditjax.convert.files import read_state_dict, write_state_dict
from ditjax.convert.pytorch_dit import check_state_dict, from_torch, infer_config, to_torch
from ditjax.models.archs import DiTConfig, dit_config

log = logging.getLogger(__name__)
VAE_DOWNSAMPLE = 8  # sd-vae-ft-*: 256px images ↔ 32x32 latents
LATENT_SCALE = 0.18215
# Each source repository's objective and default sampler (algorithms.md §2.1, §2.2), as run-config sections.
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "pytorch-dit": {"objective": {"name": "ddpm", "num_timesteps": 1000, "beta_schedule": "linear"},
                    "sample": {"sampler": "ddpm", "steps": 250, "cfg_scale": 1.5, "cfg_channels": 3}},
    "pytorch-sit": {"objective": {"name": "flow", "convention": "sit", "time_sampling": "uniform", "time_scale": 1.0},
                    "sample": {"sampler": "euler_maruyama", "steps": 250, "cfg_scale": 1.5, "cfg_channels": 3}},
}


def import_config(state_dict: dict[str, np.ndarray], *, arch: str | None = None, image_size: int | None = None,
                  pixel_space: bool = False, channels: int | None = None, num_classes: int | None = None,
                  scan_layers: bool = False) -> DiTConfig:
    """The config of a state dict: what the caller names is validated against the shapes, the rest inferred.

    Raises one ValueError listing every offending key when the named arch/sizes do not fit the tensors.
    """
    given: dict[str, Any] = {"scan_layers": scan_layers}
    if arch is not None:
        named = dit_config(arch.replace("SiT-", "DiT-", 1))  # SiT's arch names are DiT's
        given |= {k: getattr(named, k) for k in ("depth", "hidden_size", "num_heads", "patch_size")}
    if image_size is not None:
        factor = 1 if pixel_space else VAE_DOWNSAMPLE
        if image_size % factor:
            raise ValueError(f"image size {image_size} is not divisible by the VAE downsampling factor {factor}")
        given["input_size"] = image_size // factor
    if channels is not None:
        given["in_channels"] = channels
    if num_classes is not None:
        given["num_classes"] = num_classes
    try:
        cfg = infer_config(state_dict, **given)
    except ValueError:
        if arch is None:
            raise
        defaults = {"in_channels": 3 if pixel_space else 4}
        cfg = DiTConfig(**{**defaults, **given}).validate()
    check_state_dict(state_dict, cfg)
    return cfg


def run_config(cfg: DiTConfig, source_format: str, pixel_space: bool) -> dict[str, Any]:
    """A complete run config (ditjax.config schema) with the source repository's model, objective and sampler."""
    from ditjax.config import base_config

    config = base_config()
    config.model.update(dataclasses.asdict(cfg))
    for section, values in RECIPES[source_format].items():
        config[section].update(values)
    if pixel_space:
        config.data.update(image_size=cfg.input_size)
    else:
        config.data.update(name="latents", latent_scale=LATENT_SCALE)
    return config.to_dict()


def import_pytorch(source: str | Path, out_dir: str | Path, source_format: str, *, arch: str | None = None,
                   image_size: int | None = None, pixel_space: bool = False, channels: int | None = None,
                   num_classes: int | None = None, scan_layers: bool = False) -> tuple[DiTConfig, str]:
    """Convert a DiT/SiT ``.pt``/``.safetensors`` file into a ditjax checkpoint directory.

    Returns (config, which weights were used: bare state dict, or a training dict's ema/model).
    """
    if source_format not in RECIPES:
        raise ValueError(f"unknown source format {source_format!r}; choose one of {list(RECIPES)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; converting never overwrites a checkpoint")
    state_dict, weights = read_state_dict(source)
    cfg = import_config(state_dict, arch=arch, image_size=image_size, pixel_space=pixel_space, channels=channels,
                        num_classes=num_classes, scan_layers=scan_layers)
    params = from_torch(state_dict, cfg)
    del state_dict  # from here on only the converted copies are needed (a 2.7 GB file is held once)
    config = run_config(cfg, source_format, pixel_space)
    from ditjax.checkpoint import save_inference_checkpoint  # Orbax/JAX only after every check passed

    save_inference_checkpoint(out_dir, config, params)
    return cfg, weights


def export_pytorch(ckpt_dir: str | Path, target: str | Path, target_format: str) -> tuple[DiTConfig, dict]:
    """Write a ditjax checkpoint's weights (EMA when present) as a DiT/SiT state dict (.pt or .safetensors)."""
    if target_format not in RECIPES:
        raise ValueError(f"unknown target format {target_format!r}; choose one of {list(RECIPES)}")
    from ditjax.checkpoint import load_inference_checkpoint

    config, model = load_inference_checkpoint(ckpt_dir)
    objective, expected = config.get("objective", {}).get("name"), RECIPES[target_format]["objective"]["name"]
    if objective != expected:
        log.warning("exporting a %r-objective checkpoint as %s: the weights load, but the source repository's "
                    "sampler assumes %r", objective, target_format, expected)
    state_dict = to_torch(nnx.to_pure_dict(nnx.state(model, nnx.Param)), model.cfg)
    write_state_dict(state_dict, target)
    return model.cfg, config
