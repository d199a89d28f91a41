"""Linear-interpolant flow matching with a velocity target, in either time convention.

- "sit"  (willisma/SiT): t=0 is noise x0, t=1 is data x1; x_t = t*x1 + (1-t)*x0, target u = x1 - x0.
- "repa" (REPA/HASTE/DiT-MoE RF): t=0 is data x, t=1 is noise eps; x_t = (1-t)*x + t*eps, target v = eps - x.

In both, the target is dx_t/dt in that convention's own time, so an ODE step is always
x <- x + (t_next - t_cur) * v. `t` is always in the convention's own time; the model sees
`t * time_scale` (1.0 for SiT/REPA parity). Models with 2C output channels (learn_sigma) are
allowed: only the first C channels are used, as in SiT.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from ditjax.diffusion.ddpm import mean_flat

Array = jax.Array
ModelFn = Callable[[Array, Array, Array], Array]

CONVENTIONS = ("sit", "repa")
TIME_SAMPLINGS = ("uniform", "logit_normal")


def _bcast(t: Array, ndim: int) -> Array:
    t = jnp.asarray(t, jnp.float32)
    return t.reshape(jnp.shape(t) + (1,) * (ndim - jnp.ndim(t)))


@dataclass(frozen=True)
class FlowMatching:
    """Flow-matching objective; hashable so samplers can take it as a static jit argument.

    time_sampling: "uniform" t~U[0,1), or "logit_normal" t = sigmoid(n), n~N(logit_mean, logit_std^2)
    (REPA's "lognormal" sigma=exp(n), t=sigma/(1+sigma) is the same law with mean 0, std 1).
    """

    convention: str = "sit"
    time_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    time_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}, got {self.convention!r}")
        if self.time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"time_sampling must be one of {TIME_SAMPLINGS}, got {self.time_sampling!r}")

    @property
    def noise_time(self) -> float:
        """The end of [0, 1] where x_t is pure noise (sampling starts here)."""
        return 0.0 if self.convention == "sit" else 1.0

    def noise_level(self, t: Array) -> Array:
        """sigma_t, the coefficient of the noise in x_t (= time measured from the data end)."""
        return 1.0 - t if self.convention == "sit" else t

    def model_time(self, t: Array) -> Array:
        """What the network is conditioned on."""
        return jnp.asarray(t, jnp.float32) * self.time_scale

    def sample_t(self, key: Array, batch: int) -> Array:
        if self.time_sampling == "uniform":
            return jax.random.uniform(key, (batch,), jnp.float32)
        n = self.logit_mean + self.logit_std * jax.random.normal(key, (batch,), jnp.float32)
        return jax.nn.sigmoid(n)

    def interpolate(self, x_data: Array, noise: Array, t: Array) -> tuple[Array, Array]:
        """(x_t, velocity target) for data, Gaussian noise and per-sample times t [B]."""
        s = _bcast(self.noise_level(t), x_data.ndim)
        x_t = (1.0 - s) * x_data + s * noise
        target = x_data - noise if self.convention == "sit" else noise - x_data
        return x_t, target

    def score_from_velocity(self, v: Array, x_t: Array, t: Array) -> Array:
        """grad log p_t(x_t) implied by the velocity of the linear path.

        sit: (t v - x)/(1 - t);  repa: (-(1 - t) v - x)/t. Singular at the data end only.
        """
        t = _bcast(t, x_t.ndim)
        if self.convention == "sit":
            return (t * v - x_t) / (1.0 - t)
        return (-(1.0 - t) * v - x_t) / t

    def velocity(self, model_out: Array, channels: int) -> Array:
        """The velocity channels of a model output (SiT discards the learn_sigma half)."""
        if model_out.shape[-1] < channels:
            raise ValueError(f"model output has {model_out.shape[-1]} channels, need at least {channels}")
        return model_out[..., :channels].astype(jnp.float32)

    def training_losses(self, model_fn: ModelFn, x: Array, y: Array, t: Array, noise: Array) -> dict[str, Array]:
        """Per-sample {loss: mean over dims of (v_theta - target)^2}."""
        x = x.astype(jnp.float32)
        x_t, target = self.interpolate(x, noise, t)
        v = self.velocity(model_fn(x_t, self.model_time(t), y), x.shape[-1])
        return {"loss": mean_flat((v - target) ** 2)}

    def losses(self, model_fn: ModelFn, x: Array, y: Array, key: Array) -> dict[str, Array]:
        """training_losses with t and noise drawn from `key` (the trainer's entry point)."""
        t_key, n_key = jax.random.split(key)
        t = self.sample_t(t_key, x.shape[0])
        noise = jax.random.normal(n_key, x.shape, jnp.float32)
        return self.training_losses(model_fn, x, y, t, noise)
