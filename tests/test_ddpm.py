"""DDPM objective: schedule, respacing rule, loss terms against independent float64 formulas."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ditjax.diffusion.ddpm import (
    GaussianDiffusion,
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    normal_kl,
    space_timesteps,
)

B, H, C = 4, 2, 3
LN2 = math.log(2.0)


def _np_schedule():
    """DiT's linear schedule written out again in float64."""
    betas = np.linspace(1e-4, 0.02, 1000)
    ab = np.cumprod(1.0 - betas)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
    return betas, ab, ab_prev, post_var


def _rand(seed, shape, scale=1.0):
    return np.random.default_rng(seed).normal(size=shape) * scale


# ---------------------------------------------------------------- schedule and respacing


def test_linear_schedule_matches_dit_constants():
    d = GaussianDiffusion()
    betas, ab, _, post_var = _np_schedule()
    np.testing.assert_allclose(d.tables["betas"], betas, rtol=1e-12)
    np.testing.assert_allclose(d.tables["alphas_cumprod"], ab, rtol=1e-12)
    assert abs(ab[-1] - 4.04e-5) < 0.01e-5  # algorithms.md §2.1
    # log-variance clip: index 0 takes index 1's value. (DiT, like us, rebuilds the betas from
    # alpha_bar ratios even without respacing, hence ulp-level differences to linspace.)
    logv = d.tables["posterior_log_variance_clipped"]
    assert logv[0] == logv[1]
    np.testing.assert_allclose(logv[1:], np.log(post_var[1:]), rtol=1e-12)


def test_squaredcos_schedule():
    betas = GaussianDiffusion(schedule="squaredcos_cap_v2").tables["betas"]
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    assert betas[0] == pytest.approx(1 - f(0.001) / f(0.0), rel=1e-12)
    assert betas[-1] == 0.999  # capped: alpha_bar(1) = 0
    assert np.all(np.diff(betas) >= 0)


def test_space_timesteps_reference_rule():
    # "250": round(k * 999/249) with the stride accumulated by addition.
    s250 = sorted(space_timesteps(1000, "250"))
    assert len(s250) == 250
    assert s250[:4] == [0, 4, 8, 12] and s250[-3:] == [991, 995, 999]
    assert s250[124] == 497 and s250[125] == 502  # 124*4.01205 = 497.49, 125*4.01205 = 501.51
    assert sorted(space_timesteps(1000, "10")) == list(range(0, 1000, 111))  # stride 999/9 = 111
    assert sorted(space_timesteps(1000, "ddim50")) == list(range(0, 1000, 20))
    # Two sections of 50: stride 49/9 then 49/14 = 3.5, whose .5 cases use half-to-even rounding.
    expected = [0, 5, 11, 16, 22, 27, 33, 38, 44, 49] + [
        50 + k for k in [0, 4, 7, 10, 14, 18, 21, 24, 28, 32, 35, 38, 42, 46, 49]
    ]
    assert sorted(space_timesteps(100, [10, 15])) == expected
    assert space_timesteps(100, "10,15") == set(expected)
    assert space_timesteps(1000, "1000") == set(range(1000))
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim3000")
    with pytest.raises(ValueError):
        space_timesteps(10, [20])
    with pytest.raises(ValueError):  # step 0's clipped log-variance needs a step 1
        GaussianDiffusion().respaced(1).tables


def test_respaced_betas_and_model_time():
    base, spaced = GaussianDiffusion(), GaussianDiffusion().respaced(250)
    kept = spaced.timestep_map
    ab = base.tables["alphas_cumprod"]
    np.testing.assert_allclose(spaced.tables["betas"], 1 - ab[kept] / np.append(1.0, ab[kept[:-1]]), rtol=1e-12)
    np.testing.assert_allclose(spaced.tables["alphas_cumprod"], ab[kept], rtol=1e-10)

    def model(x, t, y):
        assert t.dtype == jnp.float32
        eps = jnp.broadcast_to(t[:, None, None, None], x.shape)  # mse against zero noise = t^2
        return jnp.concatenate([eps, jnp.zeros_like(x)], -1)

    t = jnp.array([0, 1, 125, 249])
    losses = jax.jit(spaced.training_losses, static_argnums=0)
    terms = losses(model, jnp.zeros((4, H, H, C)), jnp.zeros(4, jnp.int32), t, jnp.zeros((4, H, H, C)))
    np.testing.assert_array_equal(np.sqrt(terms["mse"]), [0.0, 4.0, 502.0, 999.0])  # original indices


# ---------------------------------------------------------------- distributions


def test_normal_kl_closed_form():
    m1, m2 = _rand(0, 50), _rand(1, 50)
    lv1, lv2 = _rand(2, 50), _rand(3, 50)
    s1, s2 = np.exp(lv1 / 2), np.exp(lv2 / 2)
    expected = np.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    got = normal_kl(*(jnp.asarray(a, jnp.float32) for a in (m1, lv1, m2, lv2)))
    # float32 evaluation of O(1..30) quantities: a few ulp relative error.
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-6)


def _np_tanh_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def test_discretized_likelihood_independent_float64():
    x = np.array([-1.0, -0.9995, -0.5, 0.0, 0.3, 0.999, 0.9995, 1.0, 2.0])
    means = np.array([-0.9, -1.0, -0.45, 0.1, 0.3, 1.2, 0.8, 1.0, 0.0])
    log_scales = np.array([-3.0, -2.0, -4.0, -1.0, -6.0, -2.5, -3.0, -5.0, 0.0])
    expected, probs = [], []
    for xi, mi, li in zip(x, means, log_scales):
        inv = math.exp(-li)
        hi, lo = _np_tanh_cdf(inv * (xi - mi + 1 / 255)), _np_tanh_cdf(inv * (xi - mi - 1 / 255))
        if xi < -0.999:
            p = hi  # open bin (-inf, x + 1/255]
        elif xi > 0.999:
            p = 1 - lo
        else:
            p = hi - lo
        expected.append(math.log(max(p, 1e-12)))
        probs.append(p)
    got = discretized_gaussian_log_likelihood(*(jnp.asarray(a, jnp.float32) for a in (x, means, log_scales)))
    # The bin mass is a float32 difference of CDF values <= 1, so it carries an absolute error of
    # ~1 ulp(1) = 1.2e-7 and its log an error of ~1.2e-7/p (2.5e-3 for the p = 2.5e-5 tail bin).
    tol = 1e-5 + 2.4e-7 / np.array(probs)
    assert np.all(np.abs(np.asarray(got) - np.array(expected)) <= tol)


def test_tanh_cdf_is_close_to_erf():
    xs = np.linspace(-5, 5, 101)
    exact = np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) for v in xs])
    # The tanh approximation's known maximum error is ~2e-4; a wrong constant would be ~1e-2 off.
    np.testing.assert_allclose(approx_standard_normal_cdf(jnp.asarray(xs, jnp.float32)), exact, atol=3e-4)


# ---------------------------------------------------------------- loss terms


def _np_vb(t, x0, x_t, eps_hat, v):
    """KL (t>0) or decoder NLL (t=0) per sample, in bits, from scratch in float64."""
    betas, ab, ab_prev, post_var = _np_schedule()
    out = []
    for i, ti in enumerate(t):
        c1 = betas[ti] * np.sqrt(ab_prev[ti]) / (1 - ab[ti])
        c2 = (1 - ab_prev[ti]) * np.sqrt(1 - betas[ti]) / (1 - ab[ti])
        x0_hat = (x_t[i] - np.sqrt(1 - ab[ti]) * eps_hat[i]) / np.sqrt(ab[ti])
        min_log = np.log(post_var[max(ti, 1)])
        frac = (v[i] + 1) / 2
        logvar_p = frac * np.log(betas[ti]) + (1 - frac) * min_log
        mean_p = c1 * x0_hat + c2 * x_t[i]
        if ti > 0:
            mean_q, logvar_q = c1 * x0[i] + c2 * x_t[i], min_log
            kl = 0.5 * (logvar_p - logvar_q) + (np.exp(logvar_q) + (mean_q - mean_p) ** 2) / (2 * np.exp(logvar_p)) - 0.5
            out.append(kl.mean() / LN2)
        else:
            scale = np.exp(0.5 * logvar_p)
            f = np.vectorize(
                lambda xv, m, s: math.log(
                    max(_np_tanh_cdf((xv - m + 1 / 255) / s) - _np_tanh_cdf((xv - m - 1 / 255) / s), 1e-12)
                )
            )
            out.append(-f(x0[i], mean_p, scale).mean() / LN2)
    return np.array(out)


def _fake_case(seed, t):
    n = len(t)
    x0 = np.clip(_rand(seed, (n, H, H, C), 0.5), -0.99, 0.99)  # interior bins only
    noise = _rand(seed + 1, (n, H, H, C))
    eps_hat = noise + _rand(seed + 2, (n, H, H, C), 0.1)
    v = np.tanh(_rand(seed + 3, (n, H, H, C)))
    return x0, noise, eps_hat, v


def test_hybrid_loss_terms_equal_closed_forms():
    d = GaussianDiffusion()
    t = np.array([0, 1, 10, 500, 999])
    x0, noise, eps_hat, v = _fake_case(0, t)
    out = jnp.asarray(np.concatenate([eps_hat, v], -1), jnp.float32)
    losses = jax.jit(d.training_losses, static_argnums=0)
    terms = losses(
        lambda x, tt, y: out, jnp.asarray(x0, jnp.float32), jnp.zeros(len(t), jnp.int32), jnp.asarray(t),
        jnp.asarray(noise, jnp.float32),
    )
    _, ab, _, _ = _np_schedule()
    x_t = np.sqrt(ab[t])[:, None, None, None] * x0 + np.sqrt(1 - ab[t])[:, None, None, None] * noise
    expected_vb = _np_vb(t, x0, x_t, eps_hat, v)
    expected_mse = ((noise - eps_hat) ** 2).mean(axis=(1, 2, 3))
    # float32 pipeline: x0_hat amplifies eps by sqrt(1/ab - 1) <= 157 and the KL divides by
    # variances down to 1e-4, so O(1) terms carry ~1e-6 relative error; at large t the KL
    # (~1e-4 bits) is a difference of such terms, hence an absolute floor (observed 6e-8).
    np.testing.assert_allclose(terms["vb"], expected_vb, rtol=5e-5, atol=1e-6)
    np.testing.assert_allclose(terms["mse"], expected_mse, rtol=1e-6)
    # Composition: loss = mse + vb (under jit XLA may fuse the add, hence 1-ulp slack).
    np.testing.assert_allclose(terms["loss"], terms["mse"] + terms["vb"], rtol=3e-7)
    assert terms["loss"].shape == (len(t),)


def test_vb_gradient_only_reaches_variance_channels():
    d = GaussianDiffusion()
    t = np.array([0, 3, 700])
    x0, noise, eps_hat, v = _fake_case(5, t)
    params = jnp.asarray(np.concatenate([eps_hat, v], -1), jnp.float32)

    def term(p, name):
        terms = d.training_losses(
            lambda x, tt, y: p, jnp.asarray(x0, jnp.float32), jnp.zeros(len(t), jnp.int32), jnp.asarray(t),
            jnp.asarray(noise, jnp.float32),
        )
        return terms[name].sum()

    grads = jax.jit(lambda p: [jax.grad(term)(p, n) for n in ("vb", "mse", "loss")])
    g_vb, g_mse, g_loss = grads(params)
    assert np.all(np.asarray(g_vb[..., :C]) == 0.0)  # stop_gradient on eps_hat
    assert np.abs(np.asarray(g_vb[..., C:])).min() > 0.0
    assert np.all(np.asarray(g_mse[..., C:]) == 0.0)
    np.testing.assert_array_equal(g_loss[..., :C], g_mse[..., :C])


@pytest.mark.parametrize("sigma_small", [False, True])
def test_fixed_variance(sigma_small):
    d = GaussianDiffusion(learn_sigma=False, sigma_small=sigma_small)
    betas, _, _, post_var = _np_schedule()
    t = jnp.array([0, 1, 400])
    x = jnp.zeros((3, H, H, C))
    logvar = jax.jit(d.p_mean_variance)(jnp.zeros_like(x), x, t)["log_variance"][:, 0, 0, 0]
    want = np.log(post_var[[1, 1, 400]]) if sigma_small else np.log([post_var[1], betas[1], betas[400]])
    np.testing.assert_allclose(logvar, want, rtol=1e-6)
    terms = jax.jit(d.losses, static_argnums=0)(lambda x, tt, y: x, x, jnp.zeros(3, jnp.int32), jax.random.key(0))
    np.testing.assert_array_equal(terms["vb"], 0.0)
    np.testing.assert_array_equal(terms["loss"], terms["mse"])


def test_output_channel_check():
    d = GaussianDiffusion()
    with pytest.raises(ValueError):
        d.p_mean_variance(jnp.zeros((1, H, H, C)), jnp.zeros((1, H, H, C)), jnp.array([3]))
