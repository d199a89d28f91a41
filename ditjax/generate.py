"""From a run config to objectives and samples: the one place trainer, sampler CLI and evaluator share.

``run_config`` is the plain dict stored as ``config.json`` (or a ConfigDict's ``to_dict()``).
"""
from __future__ import annotations

import functools


import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.tree_util import Partial

from ditjax.diffusion.ddpm import GaussianDiffusion
from ditjax.diffusion.flow import FlowMatching
from ditjax.diffusion.guidance import GuidanceConfig
from ditjax.diffusion.samplers import sample
from ditjax.models import DiT

Objective = GaussianDiffusion | FlowMatching


def make_objective(objective: dict, learn_sigma: bool = True) -> Objective:
    """The training objective; DDPM needs to know whether the model predicts the variance."""
    if objective["name"] == "ddpm":
        return GaussianDiffusion(num_timesteps=objective.get("num_timesteps", 1000),
                                 schedule=objective.get("beta_schedule", "linear"), learn_sigma=learn_sigma)
    if objective["name"] == "flow":
        return FlowMatching(convention=objective.get("convention", "sit"),
                            time_sampling=objective.get("time_sampling", "uniform"),
                            logit_mean=objective.get("logit_mean", 0.0), logit_std=objective.get("logit_std", 1.0),
                            time_scale=objective.get("time_scale", 1.0))
    raise ValueError(f"unknown objective {objective['name']!r}")


def make_guidance(sample_cfg: dict, num_classes: int, cfg_scale: float | None = None) -> GuidanceConfig:
    scale = sample_cfg["cfg_scale"] if cfg_scale is None else cfg_scale
    low, high = sample_cfg.get("guidance_low", 0.0), sample_cfg.get("guidance_high", 1.0)
    interval = None if (low, high) == (0.0, 1.0) else (low, high)
    channels = sample_cfg.get("cfg_channels", 0) or None
    return GuidanceConfig(scale=scale, channels=channels, interval=interval, null_label=num_classes)


@functools.cache
def _apply_fn(graphdef: nnx.GraphDef, template: nnx.State):
    """A hashable (params, x, t, y) → output function, so one compiled sampler serves any weights."""

    def apply(params: dict, x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
        state = jax.tree.map(lambda v: v, template)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(graphdef, state)(x, t, y).output

    return apply


def model_fn_from_params(graphdef: nnx.GraphDef, template: nnx.State, params: dict) -> Partial:
    return Partial(_apply_fn(graphdef, template), params)


def param_template(state: nnx.State) -> nnx.State:
    """Abstract parameter state (shapes, dtypes, metadata) to rebuild a model from pure-dict weights."""
    return _Hashable(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state))


def split_model(model: DiT) -> tuple[nnx.GraphDef, nnx.State, dict]:
    """(graphdef, abstract parameter template, pure-dict parameters) of a model."""
    graphdef, state = nnx.split(model)
    return graphdef, param_template(state), nnx.to_pure_dict(state)


class _Hashable(nnx.State):
    """A parameter template hashed by identity, usable as a cache key for compiled samplers."""

    __hash__ = object.__hash__
    __eq__ = object.__eq__


def generate(graphdef: nnx.GraphDef, template: nnx.State, params: dict, run_config: dict, labels: np.ndarray,
             noise: np.ndarray, key: jax.Array, *, sampler: str | None = None, steps: int | None = None,
             cfg_scale: float | None = None, batch_size: int | None = None) -> np.ndarray:
    """Samples (NHWC, float32) for ``labels`` from the initial ``noise``, in batches."""
    s = run_config["sample"]
    objective = make_objective(run_config["objective"], run_config["model"]["learn_sigma"])
    guidance = make_guidance(s, run_config["model"]["num_classes"], cfg_scale)
    model_fn = model_fn_from_params(graphdef, template, params)
    batch_size = batch_size or s.get("batch_size", len(labels))
    out = []
    for i in range(0, len(labels), batch_size):
        key, sub = jax.random.split(key)
        out.append(np.asarray(sample(sampler or s["sampler"], model_fn, objective,
                                     jnp.asarray(noise[i:i + batch_size]), jnp.asarray(labels[i:i + batch_size]),
                                     steps=steps or s["steps"], key=sub, guidance=guidance, eta=s.get("eta", 0.0))))
    return np.concatenate(out)


def images_to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] NHWC floats → uint8 pixels as the references do (clamp(127.5·x + 128))."""
    return np.clip(127.5 * x + 128.0, 0, 255).astype(np.uint8)


def save_grid(images: np.ndarray, path: str, columns: int) -> None:
    """Tile NHWC [-1, 1] images into one PNG, ``columns`` per row."""
    from PIL import Image

    pixels = images_to_uint8(images)
    n, h, w, c = pixels.shape
    rows = -(-n // columns)
    grid = np.zeros((rows * h, columns * w, c), np.uint8)
    for i, img in enumerate(pixels):
        r, col = divmod(i, columns)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = img
    Image.fromarray(grid[..., 0] if c == 1 else grid[..., :3]).save(path)


