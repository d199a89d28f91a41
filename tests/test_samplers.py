"""Samplers on a problem with a known answer: data N(MU_c, SIG_c^2) per channel c, with the EXACT
eps / velocity of that Gaussian plugged in as the model.

Sample sizes: 4096 x 2 x 2 pixels = 16384 draws per channel, so a sample mean has standard error
SIG/128 and a sample variance SIG^2*sqrt(2/16384) = SIG^2/90.5. Moment checks allow 5 standard
errors (plus the discretisation bias computed in float64 where a scheme has one); a wrong
variance rule, sign or missing noise term moves a moment by tens of standard errors.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ditjax.diffusion import FlowMatching, GaussianDiffusion, GuidanceConfig, sample
from ditjax.diffusion.ddpm import linear_betas
from ditjax.diffusion.samplers import (
    ddim_sample,
    ddpm_sample,
    euler_maruyama_sample,
    euler_sample,
    heun_sample,
    torch_linspace,
)

MU = np.array([0.3, -0.5, 0.0, 1.0])
SIG = np.array([0.5, 0.8, 0.1, 0.6])  # the narrow channel exposes small variance errors (SE 1.1e-4)
B, H, C = 4096, 2, 4
N_PER_CHANNEL = B * H * H
NOISE = jax.random.normal(jax.random.key(0), (B, H, H, C))
LABELS = jnp.zeros((B,), jnp.int32)
KEY = jax.random.key(1)
AB = np.cumprod(1 - linear_betas(1000))
mu32, sig32 = jnp.asarray(MU, jnp.float32), jnp.asarray(SIG, jnp.float32)


def exact_eps(x, t):
    """E[eps | x_t] for x0 ~ N(MU, SIG^2), x_t = sqrt(ab) x0 + sqrt(1-ab) eps (t = original index)."""
    a = jnp.asarray(AB, jnp.float32)[t.astype(jnp.int32)][:, None, None, None]
    return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mu32) / (a * sig32**2 + 1 - a)


def exact_ddpm_model(spaced: GaussianDiffusion):
    """[eps*, v*] where v* makes the learned-range variance the exact reverse variance
    Var[x_{k-1} | x_k] = posterior_var + coef1^2 Var[x0 | x_k]. It lies inside [posterior_var, beta]
    for SIG <= 1 (checked), so ancestral sampling is exact up to the N(0,1) start (bias < 1e-4)."""
    tb = spaced.tables
    ab = tb["alphas_cumprod"][:, None]
    var = tb["posterior_variance"][:, None] + tb["posterior_mean_coef1"][:, None] ** 2 * (
        SIG**2 * (1 - ab) / (ab * SIG**2 + 1 - ab)
    )
    lo, hi = tb["posterior_log_variance_clipped"][:, None], tb["log_betas"][:, None]
    frac = (np.log(var[1:]) - lo[1:]) / (hi[1:] - lo[1:])
    assert frac.min() >= 0 and frac.max() <= 1 + 1e-9
    frac = np.concatenate([np.zeros((1, C)), frac])  # step 0 adds no noise; its variance is unused
    v_table = jnp.asarray(2 * frac - 1, jnp.float32)
    to_step = np.zeros(1000, np.int32)
    to_step[spaced.timestep_map] = np.arange(spaced.num_steps)
    to_step = jnp.asarray(to_step)

    def model(x, t, y):
        v = v_table[to_step[t.astype(jnp.int32)]][:, None, None, :]
        return jnp.concatenate([exact_eps(x, t), jnp.broadcast_to(v, x.shape)], -1)

    return model


def exact_velocity(convention: str):
    """E[target | x_t]; in noise level s (REPA's t) the REPA target eps - x has
    E = -MU + (s - (1-s) SIG^2)(x - (1-s) MU)/((1-s)^2 SIG^2 + s^2); SiT's target is its negative."""

    def model(x, t, y):
        t = t[:, None, None, None]
        s = t if convention == "repa" else 1 - t
        v = -mu32 + (s - (1 - s) * sig32**2) * (x - (1 - s) * mu32) / ((1 - s) ** 2 * sig32**2 + s**2)
        return v if convention == "repa" else -v

    return model


def assert_moments(x, mean, var, what=""):
    x = np.asarray(x, np.float64).reshape(-1, C)
    se_mean, se_var = np.sqrt(var / N_PER_CHANNEL), var * np.sqrt(2 / N_PER_CHANNEL)
    assert np.all(np.abs(x.mean(0) - mean) < 5 * se_mean), (what, x.mean(0), mean)
    assert np.all(np.abs(x.var(0) - var) < 5 * se_var), (what, x.var(0), var)


def transport_map(z):
    """The exact probability-flow map from the noise end: data = MU + SIG z (per channel)."""
    return MU + SIG * np.asarray(z, np.float64)


# ---------------------------------------------------------------- DDPM / DDIM


def test_ddpm_ancestral_reaches_gaussian():
    base = GaussianDiffusion()
    steps = 50
    x = sample("ddpm", exact_ddpm_model(base.respaced(steps)), base, NOISE, LABELS, steps=steps, key=KEY)
    assert_moments(x, MU, SIG**2, "ddpm")


def test_ddpm_matches_float64_replay_of_ancestral_rule():
    """Per sample: x <- mu(x0_hat(eps)) + [k > 0] exp(logvar/2) z_i, z_i = normal(fold_in(key, i)),
    replayed in float64 NumPy. Adding noise on the last step would be off by ~0.01 |z|."""
    base = GaussianDiffusion()
    spaced = base.respaced(10)
    model = exact_ddpm_model(spaced)
    noise, labels = NOISE[:8], LABELS[:8]
    got = sample("ddpm", model, base, noise, labels, steps=10, key=KEY)
    tb = spaced.tables
    x = np.asarray(noise, np.float64)
    for i, k in enumerate(range(spaced.num_steps - 1, -1, -1)):
        out = np.asarray(model(jnp.asarray(x, jnp.float32), jnp.full((8,), float(spaced.timestep_map[k])), labels), np.float64)
        eps, v = out[..., :C], out[..., C:]
        x0 = np.sqrt(1 / tb["alphas_cumprod"][k]) * x - np.sqrt(1 / tb["alphas_cumprod"][k] - 1) * eps
        mean = tb["posterior_mean_coef1"][k] * x0 + tb["posterior_mean_coef2"][k] * x
        logvar = (v + 1) / 2 * np.log(tb["betas"][k]) + (1 - v) / 2 * tb["posterior_log_variance_clipped"][k]
        z = np.asarray(jax.random.normal(jax.random.fold_in(KEY, i), x.shape), np.float64)
        x = mean + (np.exp(0.5 * logvar) * z if k > 0 else 0.0)
    # float32 vs float64 over 10 steps (x0_hat amplifies eps by up to 157x): 2.6e-7 observed.
    np.testing.assert_allclose(got, x, atol=5e-6)


def test_ddim_eta0_is_deterministic_and_solves_the_ode():
    base = GaussianDiffusion()
    errors = {}
    for steps in (25, 100):
        model = exact_ddpm_model(base.respaced(steps))
        x = sample("ddim", model, base, NOISE, LABELS, steps=steps)
        if steps == 25:
            np.testing.assert_array_equal(x, sample("ddim", model, base, NOISE, LABELS, steps=steps))
        # Exact ODE from x_T ~ N(0,1) at t=999: standardise by the true N(sqrt(ab) MU, ab SIG^2 + 1 - ab).
        a = AB[-1]
        ode = MU + SIG * (np.asarray(NOISE, np.float64) - np.sqrt(a) * MU) / np.sqrt(a * SIG**2 + 1 - a)
        errors[steps] = np.abs(np.asarray(x) - ode).max()
    # DDIM is a first-order solver: 4x the steps must cut the worst-case error (over 65k draws,
    # |z| up to ~4.5) ~4x; observed 0.264 -> 0.066, i.e. ~6.6/steps. A bug in the update would
    # either not converge or converge to the wrong map.
    assert errors[100] < 0.1
    assert 3.0 < errors[25] / errors[100] < 5.0


def test_ddim_eta1_equals_ancestral_with_posterior_variance():
    """DDIM eq. 16: eta=1 is DDPM with sigma^2 = posterior variance (fixed-small), same noise."""
    steps = 20
    learned = GaussianDiffusion()
    small = GaussianDiffusion(learn_sigma=False, sigma_small=True)
    model = exact_ddpm_model(learned.respaced(steps))
    ddim = sample("ddim", model, learned, NOISE, LABELS, steps=steps, key=KEY, eta=1.0)
    ddpm = sample("ddpm", lambda x, t, y: model(x, t, y)[..., :C], small, NOISE, LABELS, steps=steps, key=KEY)
    # Same arithmetic rearranged in float32 over 20 steps: agreement to ~1e-6 relative.
    np.testing.assert_allclose(ddim, ddpm, atol=2e-5)


# ---------------------------------------------------------------- flow ODE / SDE


@pytest.mark.parametrize("name,order,coarse", [("euler", 1, 20), ("heun", 2, 20)])
def test_flow_ode_converges_to_transport_map(name, order, coarse):
    flow = FlowMatching("repa")
    model = exact_velocity("repa")
    exact = transport_map(NOISE)
    err = [np.abs(np.asarray(sample(name, model, flow, NOISE, LABELS, steps=n)) - exact).max() for n in (coarse, 2 * coarse)]
    # Doubling the steps divides the worst-case global error by 2^order: observed Euler
    # 0.203 -> 0.103, Heun 0.040 -> 0.0102 (20 -> 40 steps).
    assert 0.8 * 2**order < err[0] / err[1] < 1.25 * 2**order, err
    assert err[1] < (0.15 if order == 1 else 0.02)
    if name == "heun":  # SiT time runs the other way with the negated velocity: the same process.
        sit = sample(name, exact_velocity("sit"), FlowMatching("sit"), NOISE, LABELS, steps=coarse)
        np.testing.assert_allclose(sit, sample(name, model, flow, NOISE, LABELS, steps=coarse), atol=1e-5)


def em_replay_moments(steps: int, last: float = 0.04) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean/variance of the discrete Euler-Maruyama chain, in float64, written in REPA's
    form x <- x + (v - s*score) ds + sqrt(2 s |ds|) z on noise levels linspace(1, last, steps), 0,
    with the noise dropped on the final step. With the exact (affine) v the chain is Gaussian."""
    s = np.append(np.linspace(1.0, last, steps), 0.0)
    mean, var = np.zeros(C), np.ones(C)
    for i in range(steps):
        si, ds = s[i], s[i + 1] - s[i]
        a_v = (si - (1 - si) * SIG**2) / ((1 - si) ** 2 * SIG**2 + si**2)  # v = a_v x + b_v
        b_v = -MU - a_v * (1 - si) * MU
        a_s, b_s = (-(1 - si) * a_v - 1) / si, -(1 - si) * b_v / si  # score = (-(1-s) v - x)/s
        gain, shift = 1 + (a_v - si * a_s) * ds, (b_v - si * b_s) * ds
        mean, var = gain * mean + shift, gain**2 * var + (2 * si * abs(ds) if i < steps - 1 else 0.0)
    return mean, var


def test_euler_maruyama_matches_discrete_chain_and_target():
    steps = 100
    mean, var = em_replay_moments(steps)
    # The scheme's own bias: mean exact; variance low by <= 0.011 at 100 steps (-> 0.005 as steps
    # grow: the drift-only last step from noise level 0.04 does not restore the variance it removes).
    np.testing.assert_allclose(mean, MU, atol=1e-12)
    assert np.all((var - SIG**2 < 0) & (var - SIG**2 > -0.012))
    runs = {
        conv: sample("euler_maruyama", exact_velocity(conv), FlowMatching(conv), NOISE, LABELS, steps=steps, key=KEY)
        for conv in ("sit", "repa")
    }
    for conv, x in runs.items():
        assert_moments(x, mean, var, conv)
    # SiT (w = 1 - t, forward in t) and REPA (w = 2t/2, backward) are one process: with the same
    # key they give the same samples up to float32 rounding of the mirrored time grid.
    np.testing.assert_allclose(runs["sit"], runs["repa"], atol=1e-4)


# ---------------------------------------------------------------- structure and API


def test_torch_linspace_rounding():
    g = torch_linspace(1.0, 0.0, 51)
    assert g[0] == 1.0 and g[-1] == 0.0 and len(g) == 51
    # PyTorch fills the second half backwards from `end`: index 35 is 0 + 0.02*15.
    assert g[35] == 0.0 - (-0.02) * 15
    assert g[15] == 1.0 + (-0.02) * 15


CASES = [
    ("ddpm", GaussianDiffusion(), 250, {"key": KEY}),
    ("ddim", GaussianDiffusion(), "ddim50", {}),
    ("euler", FlowMatching("repa"), 50, {}),
    ("heun", FlowMatching("sit"), 50, {}),
    ("euler_maruyama", FlowMatching("repa"), 250, {"key": KEY}),
]
LOOPS = {"ddpm": ddpm_sample, "ddim": ddim_sample, "euler": euler_sample, "heun": heun_sample,
         "euler_maruyama": euler_maruyama_sample}
NFE = {"ddpm": 250, "ddim": 50, "euler": 50, "heun": 99, "euler_maruyama": 250}


@pytest.mark.parametrize("name,objective,steps,kwargs", CASES)
def test_sampler_is_one_loop_with_one_model_trace(name, objective, steps, kwargs):
    traces = []

    def model(x, t, y):
        traces.append(x.shape)
        out = jnp.zeros_like(x)
        return jnp.concatenate([out, out], -1) if isinstance(objective, GaussianDiffusion) else out

    noise, labels = jnp.zeros((2, H, H, C)), jnp.zeros((2,), jnp.int32)
    guidance = GuidanceConfig(scale=1.5, channels=3, interval=(0.0, 0.7))
    fn = lambda n, l: LOOPS[name](model, objective, n, l, steps=steps, guidance=guidance, **kwargs)
    jaxpr = jax.make_jaxpr(fn)(noise, labels).jaxpr
    assert traces == [(4, H, H, C)]  # traced once, CFG-doubled batch
    loops = [e for e in jaxpr.eqns if e.primitive.name in ("scan", "while")]
    assert len(loops) == 1 and loops[0].params["length"] == NFE[name]


def test_dispatcher_validates_and_caches():
    model = exact_velocity("repa")
    with pytest.raises(TypeError):
        sample("ddpm", model, FlowMatching(), NOISE[:2], LABELS[:2], steps=5, key=KEY)
    with pytest.raises(ValueError):
        sample("euler_maruyama", model, FlowMatching("repa"), NOISE[:2], LABELS[:2], steps=5)
    with pytest.raises(ValueError):
        sample("dopri5", model, FlowMatching(), NOISE[:2], LABELS[:2], steps=5)
    # A Partial's bound arguments are traced: new values reuse the compiled sampler.
    traces = []

    def apply(shift, x, t, y):
        traces.append(1)
        return x * 0 + shift

    for shift in (1.0, 2.0):
        out = sample("euler", jax.tree_util.Partial(apply, jnp.float32(shift)), FlowMatching("repa"),
                     NOISE[:2], LABELS[:2], steps=4)
        np.testing.assert_allclose(out, NOISE[:2] - shift, atol=1e-6)  # x_0 = x_1 - 1 * shift
    assert len(traces) == 1
