"""Flow-matching objective: interpolants, targets, time sampling, loss and score, both conventions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ditjax.diffusion.flow import FlowMatching

B, H, C = 3, 2, 4


def _data():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(B, H, H, C)), jnp.float32)
    noise = jnp.asarray(rng.normal(size=(B, H, H, C)), jnp.float32)
    return x, noise


def test_interpolants_and_targets():
    x, noise = _data()
    t = jnp.array([0.0, 0.25, 1.0])
    tb = t[:, None, None, None]
    xt, u = FlowMatching("sit").interpolate(x, noise, t)
    np.testing.assert_allclose(xt, tb * x + (1 - tb) * noise, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(u, x - noise, rtol=1e-6)
    np.testing.assert_array_equal(xt[0], noise[0])  # SiT: t=0 is noise
    np.testing.assert_array_equal(xt[2], x[2])
    xt, v = FlowMatching("repa").interpolate(x, noise, t)
    np.testing.assert_allclose(xt, (1 - tb) * x + tb * noise, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(v, noise - x, rtol=1e-6)
    np.testing.assert_array_equal(xt[0], x[0])  # REPA: t=0 is data
    np.testing.assert_array_equal(xt[2], noise[2])


@pytest.mark.parametrize("convention", ["sit", "repa"])
def test_loss_uses_first_channels_and_scaled_time(convention):
    flow = FlowMatching(convention, time_scale=1000.0)
    x, noise = _data()
    t = jnp.array([0.1, 0.5, 0.9])
    seen = {}
    junk = jnp.full((B, H, H, C), 123.0)

    def model(xt, tm, y):
        seen["t"] = tm
        return jnp.concatenate([xt, junk], -1)  # learn_sigma-style 2C output; second half ignored

    loss = flow.training_losses(model, x, jnp.zeros(B, jnp.int32), t, noise)["loss"]
    xt, target = flow.interpolate(x, noise, t)
    np.testing.assert_allclose(seen["t"], np.array([100.0, 500.0, 900.0]), rtol=1e-6)
    np.testing.assert_allclose(loss, np.mean((np.asarray(xt) - np.asarray(target)) ** 2, axis=(1, 2, 3)), rtol=1e-6)
    assert loss.shape == (B,)


def test_time_sampling_laws():
    n = 20000
    u = FlowMatching(time_sampling="uniform").sample_t(jax.random.key(0), n)
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 5 * np.sqrt(1 / 12 / n)  # 5 standard errors
    t = FlowMatching(time_sampling="logit_normal", logit_mean=-0.5, logit_std=1.5).sample_t(jax.random.key(1), n)
    logit = np.log(np.asarray(t, np.float64) / (1 - np.asarray(t, np.float64)))
    se = 1.5 / np.sqrt(n)
    assert abs(logit.mean() + 0.5) < 5 * se
    assert abs(logit.std() - 1.5) < 5 * 1.5 / np.sqrt(2 * n)
    with pytest.raises(ValueError):
        FlowMatching(time_sampling="lognormal")


@pytest.mark.parametrize("convention", ["sit", "repa"])
def test_score_from_velocity_of_exact_gaussian(convention):
    """Data N(mu, s^2): x_t = a x + b eps is N(a mu, a^2 s^2 + b^2); its velocity E[target|x_t] is
    linear in x_t and its score is -(x_t - a mu)/(a^2 s^2 + b^2)."""
    mu, s = 0.7, 0.4
    flow = FlowMatching(convention)
    t = jnp.array([0.1, 0.5, 0.93])
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, H, H, C)), jnp.float32)
    sigma = np.asarray(flow.noise_level(t))[:, None, None, None]  # b
    a = 1 - sigma
    var = a**2 * s**2 + sigma**2
    # E[data|x_t] and E[eps|x_t] by Gaussian conditioning, then the convention's target.
    e_data = mu + a * s**2 * (x - a * mu) / var
    e_eps = sigma * (x - a * mu) / var
    v = e_data - e_eps if convention == "sit" else e_eps - e_data
    score = flow.score_from_velocity(jnp.asarray(v, jnp.float32), x, t)
    np.testing.assert_allclose(score, -(x - a * mu) / var, rtol=1e-5, atol=1e-5)


def test_losses_draws_t_and_noise():
    flow = FlowMatching("repa", time_sampling="logit_normal")
    x, _ = _data()
    out = jax.jit(flow.losses, static_argnums=0)(lambda xt, t, y: xt, x, jnp.zeros(B, jnp.int32), jax.random.key(0))
    assert out["loss"].shape == (B,) and np.all(np.isfinite(out["loss"]))
