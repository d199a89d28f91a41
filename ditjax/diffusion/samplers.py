"""Samplers: each is ONE `lax.scan` whose body makes exactly one (CFG-batched) model call.

Entry point:

    sample(name, model_fn, objective, noise, labels, *, steps, key=None,
           guidance=GuidanceConfig(), eta=0.0) -> samples            # jitted, cached

    name       objective          stochastic  reference semantics
    "ddpm"     GaussianDiffusion  yes (key)   DiT p_sample_loop on space_timesteps(N, str(steps))
    "ddim"     GaussianDiffusion  if eta > 0  DiT ddim_sample_loop (eta) on the same respacing
    "euler"    FlowMatching       no          REPA euler_sampler: t grid of steps+1 points, noise->data
    "heun"     FlowMatching       no          same + Heun correction on all but the last step (2*steps-1 NFE)
    "euler_maruyama" FlowMatching yes (key)   REPA/SiT SDE: noise level 1 -> 0.04 in `steps` points,
                                              steps-1 EM steps (SiT 'sigma' form w = 1-t with noise
                                              sqrt(2w dt) == REPA's w = 2t with noise sqrt(w|dt|)),
                                              then one drift-only "mean" step to the data end
                                              (steps NFE)

`noise` is the initial state (NHWC, the pure-noise end), passed in so a saved noise file
reproduces a run; `labels` int32 [B]. `steps` may also be a respacing string ("ddim50") for the
DDPM samplers. The model is called as model_fn(x, t_model, y): DDPM passes the ORIGINAL step
index as float32, flow passes the convention's t times `time_scale`. Flow grids run from the
convention's noise end to its data end (SiT 0->1, REPA 1->0); `steps` counts intervals (SiT's
own `num_steps` counts grid points). State is float32 (REPA keeps float64, unavailable without
jax x64). `model_fn` is a static part of the compiled program; pass a
`jax.tree_util.Partial(apply_fn, params)` to reuse one compilation across parameter values.

The per-sampler functions (`ddpm_sample`, ...) are the unjitted loops, for embedding in larger
jitted programs.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from ditjax.diffusion.ddpm import GaussianDiffusion
from ditjax.diffusion.flow import FlowMatching
from ditjax.diffusion.guidance import GuidanceConfig, guided_output

Array = jax.Array
ModelFn = Callable[[Array, Array, Array], Array]


def torch_linspace(start: float, end: float, num: int) -> np.ndarray:
    """float64 linspace with PyTorch's rounding (first half from start, second from end).

    Grid values decide guidance-interval membership at boundaries such as t = 0.7, so they
    must match the reference bit for bit, and NumPy's linspace rounds differently.
    """
    if num == 1:
        return np.array([start], np.float64)
    step = (end - start) / (num - 1)
    idx = np.arange(num)
    return np.where(idx < num // 2, start + step * idx, end - step * (num - idx - 1))


def _full(value: Array, batch: int) -> Array:
    return jnp.full((batch,), value, jnp.float32)


def _ddpm_loop(model_fn, diffusion, noise, labels, steps, guidance, update) -> Array:
    """Scan over the respaced steps, last to first; `update(spaced, out, x, k, i)` -> next x."""
    spaced = diffusion.respaced(steps)
    ks = np.arange(spaced.num_steps)[::-1]
    active = guidance.active(spaced.timestep_map[ks].astype(np.float64))
    batch = noise.shape[0]

    def body(x, row):
        i, k, act = row
        out = guided_output(model_fn, guidance, x, _full(spaced.model_time(k), batch), labels, act)
        return update(spaced, out, x, k, i), None

    rows = (jnp.arange(len(ks)), jnp.asarray(ks), jnp.asarray(active))
    x, _ = jax.lax.scan(body, noise.astype(jnp.float32), rows)
    return x


def ddpm_sample(
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    noise: Array,
    labels: Array,
    *,
    steps: int | str,
    key: Array,
    guidance: GuidanceConfig = GuidanceConfig(),
) -> Array:
    """Ancestral sampling: x <- mean + [k > 0] * exp(logvar / 2) * z (no noise on the last step)."""

    def update(spaced, out, x, k, i):
        p = spaced.p_mean_variance(out, x, k)
        z = jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
        return jnp.where(k > 0, p["mean"] + jnp.exp(0.5 * p["log_variance"]) * z, p["mean"])

    return _ddpm_loop(model_fn, diffusion, noise, labels, steps, guidance, update)


def ddim_sample(
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    noise: Array,
    labels: Array,
    *,
    steps: int | str,
    eta: float = 0.0,
    key: Array | None = None,
    guidance: GuidanceConfig = GuidanceConfig(),
) -> Array:
    """DDIM (eq. 12): eps is re-derived from x0_hat as DiT does; eta > 0 needs `key`."""
    if eta != 0.0 and key is None:
        raise ValueError("ddim with eta > 0 is stochastic and needs a PRNG key")

    def update(spaced, out, x, k, i):
        x0 = spaced.p_mean_variance(out, x, k)["pred_xstart"]
        eps = spaced.predict_eps_from_xstart(x, k, x0)
        ab = spaced.coef("alphas_cumprod", k, x.ndim)
        ab_prev = spaced.coef("alphas_cumprod_prev", k, x.ndim)
        sigma = eta * jnp.sqrt((1 - ab_prev) / (1 - ab)) * jnp.sqrt(1 - ab / ab_prev)
        mean = x0 * jnp.sqrt(ab_prev) + jnp.sqrt(1 - ab_prev - sigma**2) * eps
        if eta == 0.0:
            return mean
        z = jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
        return jnp.where(k > 0, mean + sigma * z, mean)

    return _ddpm_loop(model_fn, diffusion, noise, labels, steps, guidance, update)


def _ode_sample(model_fn, flow, noise, labels, steps, heun, guidance) -> Array:
    """Euler / Heun as one scan over model evaluations (2*steps-1 for Heun, one call per body).

    Carry (x, x_eval, d_prev). A predictor row evaluates d at (x, t_i) and either commits
    x + dt*d (Euler, and Heun's last step) or stages it as x_eval; a corrector row evaluates
    d' at (x_eval, t_{i+1}) and commits x + dt*(d + d')/2. Guidance is decided by t_i for both.
    """
    grid = torch_linspace(flow.noise_time, 1.0 - flow.noise_time, steps + 1)
    rows = []  # (t_eval, t_step, dt, is_corrector, commits)
    for i in range(steps):
        dt = grid[i + 1] - grid[i]
        correct = heun and i < steps - 1
        rows.append((grid[i], grid[i], dt, False, not correct))
        if correct:
            rows.append((grid[i + 1], grid[i], dt, True, True))
    t_eval, t_step, dt, is_corr, commits = (np.array(c) for c in zip(*rows))
    xs = (
        jnp.asarray(t_eval, jnp.float32),
        jnp.asarray(dt, jnp.float32),
        jnp.asarray(guidance.active(t_step)),
        jnp.asarray(is_corr),
        jnp.asarray(commits),
    )
    batch, channels = noise.shape[0], noise.shape[-1]

    def body(carry, row):
        x, x_eval, d_prev = carry
        t, h, act, corr, commit = row
        out = guided_output(model_fn, guidance, x_eval, _full(flow.model_time(t), batch), labels, act)
        d = flow.velocity(out, channels)
        new = jnp.where(corr, x + h * (0.5 * d_prev + 0.5 * d), x + h * d)
        # The next evaluation point is `new` either way: the staged predictor or the committed x.
        return (jnp.where(commit, new, x), new, d), None

    x0 = noise.astype(jnp.float32)
    (x, _, _), _ = jax.lax.scan(body, (x0, x0, jnp.zeros_like(x0)), xs)
    return x


def euler_sample(
    model_fn: ModelFn,
    flow: FlowMatching,
    noise: Array,
    labels: Array,
    *,
    steps: int,
    guidance: GuidanceConfig = GuidanceConfig(),
) -> Array:
    """Probability-flow ODE, explicit Euler, `steps` NFE."""
    return _ode_sample(model_fn, flow, noise, labels, steps, False, guidance)


def heun_sample(
    model_fn: ModelFn,
    flow: FlowMatching,
    noise: Array,
    labels: Array,
    *,
    steps: int,
    guidance: GuidanceConfig = GuidanceConfig(),
) -> Array:
    """Probability-flow ODE, Heun (trapezoidal corrector) except on the last step, 2*steps-1 NFE."""
    return _ode_sample(model_fn, flow, noise, labels, steps, True, guidance)


def euler_maruyama_sample(
    model_fn: ModelFn,
    flow: FlowMatching,
    noise: Array,
    labels: Array,
    *,
    steps: int,
    key: Array,
    guidance: GuidanceConfig = GuidanceConfig(),
    last_step_size: float = 0.04,
) -> Array:
    """Reverse SDE with diffusion w = sigma_t (the noise level), both conventions alike:

    x <- x + dt*v + |dt|*sigma_t*score + sqrt(2*sigma_t*|dt|)*z, where dt is the signed step in
    the convention's time. This is SiT's dX = (v + w s)dt + sqrt(2w)dW with w = 1 - t and REPA's
    x + (v - t s)dt + sqrt(2t)|dt|^(1/2) z written once. The last step (noise level
    last_step_size -> 0) is drift only.
    """
    data_time = 1.0 - flow.noise_time
    stop = data_time + (flow.noise_time - data_time) * last_step_size
    grid = np.append(torch_linspace(flow.noise_time, stop, steps), data_time)
    t, dt = grid[:-1], np.diff(grid)
    sigma = np.asarray(flow.noise_level(t))
    noise_coef = np.sqrt(2.0 * sigma * np.abs(dt))
    noise_coef[-1] = 0.0
    xs = (
        jnp.arange(steps),
        jnp.asarray(t, jnp.float32),
        jnp.asarray(dt, jnp.float32),
        jnp.asarray(sigma, jnp.float32),
        jnp.asarray(noise_coef, jnp.float32),
        jnp.asarray(guidance.active(t)),
    )
    batch, channels = noise.shape[0], noise.shape[-1]

    def body(x, row):
        i, t_i, h, sig, c, act = row
        out = guided_output(model_fn, guidance, x, _full(flow.model_time(t_i), batch), labels, act)
        v = flow.velocity(out, channels)
        score = flow.score_from_velocity(v, x, t_i)
        z = jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
        return x + h * v + jnp.abs(h) * sig * score + c * z, None

    x, _ = jax.lax.scan(body, noise.astype(jnp.float32), xs)
    return x


SAMPLERS: dict[str, tuple[Callable[..., Array], type, bool]] = {
    # name: (loop, objective type, needs a key)
    "ddpm": (ddpm_sample, GaussianDiffusion, True),
    "ddim": (ddim_sample, GaussianDiffusion, False),
    "euler": (euler_sample, FlowMatching, False),
    "heun": (heun_sample, FlowMatching, False),
    "euler_maruyama": (euler_maruyama_sample, FlowMatching, True),
}


@partial(jax.jit, static_argnames=("name", "objective", "steps", "guidance", "eta"))
def _sample_jit(model_fn, noise, labels, key, *, name, objective, steps, guidance, eta):
    loop, _, needs_key = SAMPLERS[name]
    kwargs = {"key": key} if needs_key or name == "ddim" else {}
    if name == "ddim":
        kwargs["eta"] = eta
    return loop(model_fn, objective, noise, labels, steps=steps, guidance=guidance, **kwargs)


def sample(
    name: str,
    model_fn: ModelFn,
    objective: GaussianDiffusion | FlowMatching,
    noise: Array,
    labels: Array,
    *,
    steps: int | str,
    key: Array | None = None,
    guidance: GuidanceConfig = GuidanceConfig(),
    eta: float = 0.0,
) -> Array:
    """Run sampler `name` (see module docstring) from `noise`; returns float32 samples like noise.

    eta is DDIM's stochasticity (ignored by the others). Compiled once per (name, objective,
    steps, guidance, eta, model_fn, shapes).
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {sorted(SAMPLERS)}")
    _, objective_type, needs_key = SAMPLERS[name]
    if not isinstance(objective, objective_type):
        raise TypeError(f"sampler {name!r} needs a {objective_type.__name__}, got {type(objective).__name__}")
    if key is None and (needs_key or (name == "ddim" and eta != 0.0)):
        raise ValueError(f"sampler {name!r} is stochastic and needs a PRNG key")
    if not isinstance(model_fn, Partial):
        model_fn = Partial(model_fn)
    return _sample_jit(
        model_fn, noise, labels, key, name=name, objective=objective, steps=steps, guidance=guidance, eta=float(eta)
    )
