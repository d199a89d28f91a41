"""Classifier-free guidance with one batched model call per evaluation.

out_guided = out_uncond + scale * (out_cond - out_uncond), applied to:
- channels=None: all C data channels (eps or velocity) -- the standard rule (REPA, DiT-MoE);
- channels=3: only output channels 0..2 -- DiT/SiT `forward_with_cfg` kept for FID parity; the
  4th data channel and every variance channel come from the conditional half unguided. (DiT
  returns `cat([guided, rest])` for both halves of its doubled batch and keeps the first half,
  whose `rest` is the conditional output, which is what this returns.)
Channels past C (learned variance) are never guided.

interval=(low, high) is in the objective's own time (DDPM: original step index 0..999; flow:
its convention's t, before time_scale): guided iff low <= t <= high, else the conditional output.
Outside the interval the doubled batch is still evaluated and the unconditional half discarded,
so each sampler's loop body contains exactly one model call (one trace, one compiled copy).
scale == 1 skips the unconditional half entirely and is exactly the conditional model.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ModelFn = Callable[[Array, Array, Array], Array]


@dataclass(frozen=True)
class GuidanceConfig:
    """scale: guidance weight (1 = off). channels: None (all data channels) or 3 (DiT legacy).
    interval: (low, high) in objective time, or None for always. null_label: the "no class" id."""

    scale: float = 1.0
    channels: int | None = None
    interval: tuple[float, float] | None = None
    null_label: int = 1000

    def __post_init__(self) -> None:
        if self.interval is not None:  # a tuple keeps the config hashable (a static jit argument)
            object.__setattr__(self, "interval", tuple(float(v) for v in self.interval))

    @property
    def enabled(self) -> bool:
        return self.scale != 1.0

    def active(self, t: np.ndarray | Array) -> np.ndarray | Array:
        """Whether guidance applies at objective time t.

        Samplers call this on their static float64 NumPy grids, so boundary cases such as
        t == 0.7 are decided in double precision exactly as the PyTorch references decide them.
        """
        if self.interval is None:
            return np.full(np.shape(t), True)
        low, high = self.interval
        return (low <= t) & (t <= high)


def combine(cond: Array, uncond: Array, scale: float, guided_channels: int) -> Array:
    """Guide the first `guided_channels` channels; keep the rest from `cond`."""
    k = guided_channels
    guided = uncond[..., :k] + scale * (cond[..., :k] - uncond[..., :k])
    return jnp.concatenate([guided, cond[..., k:]], axis=-1)


def guided_output(
    model_fn: ModelFn,
    guidance: GuidanceConfig,
    x: Array,
    model_t: Array,
    y: Array,
    active: Array | bool = True,
) -> Array:
    """Model output at (x, model_t, y) under `guidance`; `active` (scalar or [B]) comes from
    `guidance.active(t)` and selects the guided or the conditional output."""
    if not guidance.enabled:
        return model_fn(x, model_t, y)
    batch = x.shape[0]
    out = model_fn(
        jnp.concatenate([x, x]),
        jnp.concatenate([model_t, model_t]),
        jnp.concatenate([y, jnp.full_like(y, guidance.null_label)]),
    )
    out = out.astype(jnp.float32)  # the guidance extrapolation amplifies low-precision error
    cond, uncond = out[:batch], out[batch:]
    channels = x.shape[-1] if guidance.channels is None else guidance.channels
    guided = combine(cond, uncond, guidance.scale, channels)
    if guidance.interval is None:
        return guided
    active = jnp.asarray(active)
    return jnp.where(active.reshape(active.shape + (1,) * (x.ndim - active.ndim)), guided, cond)
