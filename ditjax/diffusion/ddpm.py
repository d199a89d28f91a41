"""Discrete-time Gaussian diffusion with learned-range variance (DiT `diffusion/`).

The schedule is held in float64 NumPy (as DiT does) and gathered into float32 at use, so the
numbers the JAX code sees equal DiT's `_extract_into_tensor(...).float()`. Everything else is a
pure function of arrays, so it jits and differentiates like any other JAX code.

Time convention: `t` is an int index into *this* diffusion's steps. A respaced diffusion (built
with `respacing=...`) has fewer steps, but the model is always called with the ORIGINAL step
index as float32 (`model_time`), exactly like DiT's `_WrappedModel`.

Model output: NHWC with C channels (fixed variance) or 2C channels `[eps, v]` (learned range),
where the variance is `exp(frac*log(beta) + (1-frac)*log(posterior_var_clipped))`, frac=(v+1)/2.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ModelFn = Callable[[Array, Array, Array], Array]


def linear_betas(num_timesteps: int) -> np.ndarray:
    """Ho et al. linear schedule, rescaled so any step count spans the same noise range."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def squaredcos_cap_v2_betas(num_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """IDDPM cosine schedule: betas that discretise alpha_bar(s) = cos^2((s+0.008)/1.008 * pi/2)."""

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [
            min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
            for i in range(num_timesteps)
        ],
        dtype=np.float64,
    )


BETA_SCHEDULES: dict[str, Callable[[int], np.ndarray]] = {
    "linear": linear_betas,
    "squaredcos_cap_v2": squaredcos_cap_v2_betas,
}


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
    """Which original steps a respaced sampler keeps (DiT/IDDPM `respace.py` rule, bit-exact).

    `section_counts`: "ddimN" (uniform integer stride giving exactly N steps), a comma-separated
    string or a list of per-section counts. Each of the equal sections takes round(k*stride)
    with the stride accumulated by repeated float addition and Python's half-to-even round,
    because that is what decides the reference indices (e.g. "250" -> {0, 4, 8, ..., 995, 999}).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return set(steps)


def mean_flat(x: Array) -> Array:
    """Mean over all non-batch dimensions."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1: Array, logvar1: Array, mean2: Array, logvar2: Array) -> Array:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: Array) -> Array:
    """The tanh approximation of Phi used by DiT's decoder likelihood (kept for parity, not erf)."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Array, means: Array, log_scales: Array) -> Array:
    """Elementwise log-probability (nats) of the 1/255-wide bin around x; open-ended bins past +-0.999."""
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _extract(table: np.ndarray, t: Array, ndim: int) -> Array:
    """table[t] as float32, shaped to broadcast against an ndim-array whose leading dims are t's."""
    values = jnp.asarray(table, jnp.float32)[t]
    return values.reshape(jnp.shape(t) + (1,) * (ndim - jnp.ndim(t)))


@dataclass(frozen=True)
class GaussianDiffusion:
    """An eps-prediction diffusion; hashable so samplers can take it as a static jit argument.

    num_timesteps: length of the base schedule (1000 for DiT).
    schedule: a key of BETA_SCHEDULES.
    learn_sigma: model emits [eps, v] (DiT default); else a fixed variance is used.
    sigma_small: fixed variance = clipped posterior variance instead of beta (only if not learn_sigma).
    respacing: "" keeps every step; otherwise `space_timesteps` section counts ("250", "ddim50", "10,15").
    """

    num_timesteps: int = 1000
    schedule: str = "linear"
    learn_sigma: bool = True
    sigma_small: bool = False
    respacing: str = ""

    def respaced(self, section_counts: int | str) -> GaussianDiffusion:
        """The same base process restricted to `space_timesteps(num_timesteps, str(section_counts))`."""
        return dataclasses.replace(self, respacing=str(section_counts))

    @cached_property
    def timestep_map(self) -> np.ndarray:
        """Original step index of each of this diffusion's steps (ascending)."""
        if not self.respacing:
            return np.arange(self.num_timesteps)
        return np.array(sorted(space_timesteps(self.num_timesteps, self.respacing)))

    @cached_property
    def tables(self) -> dict[str, np.ndarray]:
        """float64 per-step constants; respaced betas come from alpha_bar ratios as in DiT."""
        base_ac = np.cumprod(1.0 - BETA_SCHEDULES[self.schedule](self.num_timesteps))
        kept_ac = base_ac[self.timestep_map]
        if len(kept_ac) < 2:
            raise ValueError("a diffusion needs at least 2 steps (step 0's variance borrows step 1's)")
        betas = 1.0 - kept_ac / np.append(1.0, kept_ac[:-1])
        ac = np.cumprod(1.0 - betas)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        # Posterior variance is 0 at step 0; DiT replaces its log by step 1's value (also in the
        # "fixed large" variance, whose step 0 would otherwise be beta_0).
        post_logvar = np.log(np.append(post_var[1], post_var[1:]))
        fixed_logvar = post_logvar if self.sigma_small else np.log(np.append(post_var[1], betas[1:]))
        return {
            "betas": betas,
            "log_betas": np.log(betas),
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1.0),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": post_logvar,
            "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac),
            "fixed_log_variance": fixed_logvar,
        }

    @property
    def num_steps(self) -> int:
        return len(self.timestep_map)

    def coef(self, name: str, t: Array, ndim: int) -> Array:
        """tables[name][t] as float32, broadcastable against an ndim-array batched like t."""
        return _extract(self.tables[name], t, ndim)

    def model_time(self, t: Array) -> Array:
        """Original step index (float32) that the model is conditioned on."""
        return jnp.asarray(self.timestep_map, jnp.float32)[t]

    def sample_t(self, key: Array, batch: int) -> Array:
        """Uniform step indices, as DiT's `torch.randint(0, num_timesteps)`."""
        return jax.random.randint(key, (batch,), 0, self.num_steps)

    def q_sample(self, x0: Array, t: Array, noise: Array) -> Array:
        """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise."""
        return (
            self.coef("sqrt_alphas_cumprod", t, x0.ndim) * x0
            + self.coef("sqrt_one_minus_alphas_cumprod", t, x0.ndim) * noise
        )

    def q_posterior_mean_variance(self, x0: Array, x_t: Array, t: Array) -> tuple[Array, Array, Array]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0)."""
        nd = x_t.ndim
        mean = self.coef("posterior_mean_coef1", t, nd) * x0 + self.coef("posterior_mean_coef2", t, nd) * x_t
        return mean, self.coef("posterior_variance", t, nd), self.coef("posterior_log_variance_clipped", t, nd)

    def predict_xstart_from_eps(self, x_t: Array, t: Array, eps: Array) -> Array:
        """x0_hat from eps (never clipped: DiT samples latents with clip_denoised=False)."""
        nd = x_t.ndim
        return self.coef("sqrt_recip_alphas_cumprod", t, nd) * x_t - self.coef("sqrt_recipm1_alphas_cumprod", t, nd) * eps

    def predict_eps_from_xstart(self, x_t: Array, t: Array, x0: Array) -> Array:
        nd = x_t.ndim
        return (self.coef("sqrt_recip_alphas_cumprod", t, nd) * x_t - x0) / self.coef(
            "sqrt_recipm1_alphas_cumprod", t, nd
        )

    def split_output(self, model_out: Array, channels: int) -> tuple[Array, Array | None]:
        """(eps, v) from the model output; v is None for fixed variance. Extra channels are an error."""
        want = 2 * channels if self.learn_sigma else channels
        if model_out.shape[-1] != want:
            raise ValueError(f"model output has {model_out.shape[-1]} channels, expected {want}")
        model_out = model_out.astype(jnp.float32)
        if not self.learn_sigma:
            return model_out, None
        return model_out[..., :channels], model_out[..., channels:]

    def p_mean_variance(self, model_out: Array, x_t: Array, t: Array) -> dict[str, Array]:
        """Mean, log-variance and x0_hat of p(x_{t-1} | x_t) given the raw model output."""
        nd = x_t.ndim
        eps, v = self.split_output(model_out, x_t.shape[-1])
        if v is None:
            log_variance = self.coef("fixed_log_variance", t, nd) * jnp.ones_like(x_t)
        else:
            frac = (v + 1.0) / 2.0
            log_variance = frac * self.coef("log_betas", t, nd) + (1.0 - frac) * self.coef(
                "posterior_log_variance_clipped", t, nd
            )
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {"mean": mean, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def vb_terms_bpd(self, model_out: Array, x0: Array, x_t: Array, t: Array) -> Array:
        """Per-sample VLB term in bits: decoder NLL at t == 0, posterior KL otherwise."""
        true_mean, _, true_logvar = self.q_posterior_mean_variance(x0, x_t, t)
        p = self.p_mean_variance(model_out, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_logvar, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -mean_flat(
            discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])
        ) / math.log(2.0)
        return jnp.where(t == 0, nll, kl)

    def training_losses(self, model_fn: ModelFn, x0: Array, y: Array, t: Array, noise: Array) -> dict[str, Array]:
        """DiT hybrid loss per sample: {loss = mse + vb, mse, vb}; vb is 0 for fixed variance.

        The VB term sees stop_gradient(eps_hat), so only the variance channels learn from it.
        """
        x0 = x0.astype(jnp.float32)
        x_t = self.q_sample(x0, t, noise)
        model_out = model_fn(x_t, self.model_time(t), y)
        eps, v = self.split_output(model_out, x0.shape[-1])
        mse = mean_flat((noise - eps) ** 2)
        if v is None:
            vb = jnp.zeros_like(mse)
        else:
            frozen = jnp.concatenate([jax.lax.stop_gradient(eps), v], axis=-1)
            vb = self.vb_terms_bpd(frozen, x0, x_t, t)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def losses(self, model_fn: ModelFn, x0: Array, y: Array, key: Array) -> dict[str, Array]:
        """training_losses with t and noise drawn from `key` (the trainer's entry point)."""
        t_key, n_key = jax.random.split(key)
        t = self.sample_t(t_key, x0.shape[0])
        noise = jax.random.normal(n_key, x0.shape, jnp.float32)
        return self.training_losses(model_fn, x0, y, t, noise)
