"""PyTorch DiT/SiT weight files ↔ ditjax checkpoint directories.

Everything that can go wrong with the input (file format, keys, shapes, pos_embed, config) is checked
in NumPy before JAX or Orbax is touched, so a bad file fails in well under a second.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ditjax.convert.files import read_state_dict, write_state_dict
from ditjax.convert.pytorch_dit import arch_name, check_state_dict, from_torch, infer_config, to_torch
from ditjax.models.archs import ARCHS, SIZES, DiTConfig

log = logging.getLogger(__name__)
VAE_DOWNSAMPLE = 8  # sd-vae-ft-*: 256px images ↔ 32x32 latents
# The objective each source repository trained with (field names follow ditjax.diffusion's dataclasses).
OBJECTIVES: dict[str, dict[str, Any]] = {
    "pytorch-dit": {"name": "ddpm", "num_timesteps": 1000, "schedule": "linear"},
    "pytorch-sit": {"name": "flow", "convention": "sit", "time_sampling": "uniform", "time_scale": 1.0},
}


def import_config(state_dict: dict[str, np.ndarray], *, arch: str | None = None, image_size: int | None = None,
                  pixel_space: bool = False, channels: int | None = None, num_classes: int | None = None,
                  scan_layers: bool = False) -> DiTConfig:
    """The config of a state dict: what the caller names is validated against the shapes, the rest inferred.

    Raises one ValueError listing every offending key when the named arch/sizes do not fit the tensors.
    """
    given: dict[str, Any] = {"scan_layers": scan_layers}
    if arch is not None:
        name = arch.replace("SiT-", "DiT-", 1)  # SiT's arch names are DiT's
        if name not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)} (or the same with SiT-)")
        size, patch = ARCHS[name]
        depth, hidden, heads = SIZES[size]
        given |= dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)
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


def run_config(cfg: DiTConfig, source_format: str, **provenance: Any) -> dict[str, Any]:
    """config.json for converted weights: the model, the objective it was trained with, where it came from."""
    model = dataclasses.asdict(cfg)
    if (name := arch_name(cfg)) is not None:
        model["arch"] = name
    return {"model": model, "objective": dict(OBJECTIVES[source_format]),
            "converted_from": {"format": source_format, **provenance}}


def import_pytorch(source: str | Path, out_dir: str | Path, source_format: str, *, arch: str | None = None,
                   image_size: int | None = None, pixel_space: bool = False, channels: int | None = None,
                   num_classes: int | None = None, scan_layers: bool = False) -> tuple[DiTConfig, str]:
    """Convert a DiT/SiT ``.pt``/``.safetensors`` file into a ditjax checkpoint directory.

    Returns (config, which weights were used: bare state dict, or a training dict's ema/model).
    """
    if source_format not in OBJECTIVES:
        raise ValueError(f"unknown source format {source_format!r}; choose one of {list(OBJECTIVES)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; converting never overwrites a checkpoint")
    state_dict, weights = read_state_dict(source)
    cfg = import_config(state_dict, arch=arch, image_size=image_size, pixel_space=pixel_space, channels=channels,
                        num_classes=num_classes, scan_layers=scan_layers)
    params = from_torch(state_dict, cfg)
    image = cfg.input_size * (1 if pixel_space else VAE_DOWNSAMPLE)
    config = run_config(cfg, source_format, file=Path(source).name, weights=weights, image_size=image,
                        space="pixel" if pixel_space else "latent")
    from ditjax.checkpoint import save_inference_checkpoint  # Orbax/JAX only after every check passed

    save_inference_checkpoint(out_dir, config, params)
    return cfg, weights


def export_pytorch(ckpt_dir: str | Path, target: str | Path, target_format: str) -> tuple[DiTConfig, dict]:
    """Write a ditjax checkpoint's weights (EMA when present) as a DiT/SiT state dict (.pt or .safetensors)."""
    if target_format not in OBJECTIVES:
        raise ValueError(f"unknown target format {target_format!r}; choose one of {list(OBJECTIVES)}")
    from flax import nnx

    from ditjax.checkpoint import load_inference_checkpoint

    config, model = load_inference_checkpoint(ckpt_dir)
    objective = config.get("objective", {}).get("name")
    if objective != OBJECTIVES[target_format]["name"]:
        log.warning("exporting a %r-objective checkpoint as %s: the weights load, but the source repository's "
                    "sampler assumes %r", objective, target_format, OBJECTIVES[target_format]["name"])
    state_dict = to_torch(nnx.to_pure_dict(nnx.state(model, nnx.Param)), model.cfg)
    write_state_dict(state_dict, target)
    return model.cfg, config
