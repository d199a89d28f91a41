"""Classifier-free guidance rules, interval switching, and guided sampling of known Gaussians."""
import jax
import jax.numpy as jnp
import numpy as np

from ditjax.diffusion import FlowMatching, GuidanceConfig, sample
from ditjax.diffusion.guidance import guided_output

B, H, C = 2, 2, 4
NULL = 10


def _fake_model(calls):
    """Output channel k of sample b: cond = 1 + k + 10 b + x, uncond = -(k + 1) + 0.5 x; 2C channels."""

    def model(x, t, y):
        calls.append((x.shape[0], np.asarray(y)))
        k = jnp.arange(2 * C, dtype=jnp.float32)
        b = jnp.arange(x.shape[0], dtype=jnp.float32)[:, None, None, None] % B
        xx = jnp.concatenate([x, x], -1)
        cond = 1 + k + 10 * b + xx
        uncond = -(k + 1) + 0.5 * xx
        return jnp.where((y == NULL)[:, None, None, None], uncond, cond)

    return model


def _inputs():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(B, H, H, C)), jnp.float32)
    return x, jnp.array([3, 7], jnp.int32), jnp.full((B,), 0.5, jnp.float32)


def _hand(x, scale, guided_channels):
    xx = np.concatenate([x, x], -1)
    k = np.arange(2 * C)
    b = np.arange(B)[:, None, None, None]
    cond = 1 + k + 10 * b + xx
    uncond = -(k + 1) + 0.5 * xx
    out = cond.copy()
    out[..., :guided_channels] = uncond[..., :guided_channels] + scale * (cond - uncond)[..., :guided_channels]
    return out


def test_all_channel_rule_in_one_batched_call():
    x, y, t = _inputs()
    calls = []
    out = guided_output(_fake_model(calls), GuidanceConfig(scale=4.0, null_label=NULL), x, t, y)
    assert len(calls) == 1 and calls[0][0] == 2 * B
    np.testing.assert_array_equal(calls[0][1], [3, 7, NULL, NULL])
    # All C data channels guided; the variance half (channels C..2C-1) is the conditional output.
    np.testing.assert_allclose(out, _hand(np.asarray(x), 4.0, C), rtol=1e-6)


def test_legacy_three_channel_rule():
    x, y, t = _inputs()
    out = guided_output(_fake_model([]), GuidanceConfig(scale=1.5, channels=3, null_label=NULL), x, t, y)
    expected = _hand(np.asarray(x), 1.5, 3)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    cond = np.asarray(_fake_model([])(x, t, y))
    np.testing.assert_array_equal(out[..., 3:], cond[..., 3:])  # channel 3 and variance: cond, bitwise
    assert not np.allclose(out[..., :3], cond[..., :3])


def test_scale_one_is_exactly_conditional():
    x, y, t = _inputs()
    calls = []
    out = guided_output(_fake_model(calls), GuidanceConfig(scale=1.0, null_label=NULL), x, t, y)
    assert len(calls) == 1 and calls[0][0] == B  # no unconditional half at all
    np.testing.assert_array_equal(out, _fake_model([])(x, t, y))


def test_interval_switching():
    cfg = GuidanceConfig(scale=2.0, interval=(0.0, 0.7), null_label=NULL)
    np.testing.assert_array_equal(cfg.active(np.array([0.0, 0.5, 0.7, 0.70001, 1.0])), [1, 1, 1, 0, 0])
    assert GuidanceConfig(scale=2.0).active(np.array(0.9))  # no interval: always on
    x, y, t = _inputs()
    model = _fake_model([])
    guided = _hand(np.asarray(x), 2.0, C)
    cond = np.asarray(model(x, t, y))
    np.testing.assert_allclose(guided_output(model, cfg, x, t, y, jnp.array(True)), guided, rtol=1e-6)
    np.testing.assert_array_equal(guided_output(model, cfg, x, t, y, jnp.array(False)), cond)
    per_sample = guided_output(model, cfg, x, t, y, jnp.array([True, False]))
    np.testing.assert_allclose(per_sample[0], guided[0], rtol=1e-6)
    np.testing.assert_array_equal(per_sample[1], cond[1])


# ---------------------------------------------------------------- guidance inside samplers

SIG = 0.5


def _gaussian_velocity(mu_of_label):
    """Exact REPA-convention velocity for data N(mu_y, SIG^2): E[eps - x | x_t] by conditioning."""

    def model(x, t, y):
        mu = mu_of_label[y][:, None, None, None]
        s = t[:, None, None, None]
        var = (1 - s) ** 2 * SIG**2 + s**2
        return -mu + (s - (1 - s) * SIG**2) * (x - (1 - s) * mu) / var

    return model


def test_guided_flow_sampling_reaches_extrapolated_gaussian():
    """The velocity is affine in mu at fixed SIG, so u + w(c - u) is the exact velocity of
    N(mu_u + w(mu_c - mu_u), SIG^2): guided Heun must map noise z to mu_g + SIG z."""
    mu_of_label = jnp.array([0.5, -0.2])  # label 0 = class, label 1 = null
    noise = jax.random.normal(jax.random.key(0), (64, H, H, C))
    labels = jnp.zeros((64,), jnp.int32)
    flow = FlowMatching("repa")
    model = _gaussian_velocity(mu_of_label)
    cfg = GuidanceConfig(scale=3.0, null_label=1)
    x = sample("heun", model, flow, noise, labels, steps=20, guidance=cfg)
    mu_g = -0.2 + 3.0 * (0.5 + 0.2)
    # Heun's 20-step discretisation error here is 8.3e-3 (observed); no guidance would be 1.4 off.
    np.testing.assert_allclose(x, mu_g + SIG * noise, atol=1.5e-2)
    # An interval that contains no grid time switches guidance off: exactly the conditional flow.
    off = GuidanceConfig(scale=3.0, interval=(2.0, 3.0), null_label=1)
    plain = sample("euler", model, flow, noise, labels, steps=8)
    np.testing.assert_allclose(sample("euler", model, flow, noise, labels, steps=8, guidance=off), plain, atol=1e-6)
    # Guided only for t <= 0.5 (the data half): lands between the two, still per-sample affine.
    half = sample("euler", model, flow, noise, labels, steps=8, guidance=GuidanceConfig(3.0, interval=(0.0, 0.5), null_label=1))
    assert np.all(np.abs(np.asarray(half - plain)) > 1e-3) and np.all(np.abs(np.asarray(half - x)) > 1e-3)


def test_heun_guidance_interval_replays_repa_loop():
    """REPA's euler_sampler(heun=True): guidance on iff low <= t_cur <= high, and the corrector
    reuses t_cur's decision. With steps=4 and high=0.6, step t_cur=0.75 has its corrector at 0.5
    (inside the interval) but must stay unguided. Replayed in float64 NumPy."""
    mu_of_label = jnp.array([0.5, -0.2])
    model = _gaussian_velocity(mu_of_label)
    noise = jax.random.normal(jax.random.key(3), (8, H, H, C))
    labels = jnp.zeros((8,), jnp.int32)
    cfg = GuidanceConfig(scale=2.5, interval=(0.0, 0.6), null_label=1)
    got = sample("heun", model, FlowMatching("repa"), noise, labels, steps=4, guidance=cfg)

    def d(x, t, guided):
        ones = jnp.full((8,), t, jnp.float32)
        c = np.asarray(model(jnp.asarray(x, jnp.float32), ones, labels), np.float64)
        u = np.asarray(model(jnp.asarray(x, jnp.float32), ones, jnp.ones_like(labels)), np.float64)
        return u + 2.5 * (c - u) if guided else c

    ts = np.linspace(1.0, 0.0, 5)
    x = np.asarray(noise, np.float64)
    for i, (t_cur, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        guided = 0.0 <= t_cur <= 0.6
        d_cur = d(x, t_cur, guided)
        x_next = x + (t_next - t_cur) * d_cur
        if i < 3:
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d(x_next, t_next, guided))
        x = x_next
    # float32 model evaluations vs a float64 state over 7 NFE: ~1e-6.
    np.testing.assert_allclose(got, x, atol=2e-5)
