"""The train step in-process: gradient accumulation, EMA, NaN guard, learning-rate schedules."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ditjax.config import base_config
from ditjax.models import dit_config
from ditjax.parallel.mesh import make_mesh, resolve_rules
from ditjax.train.optim import learning_rate_schedule, make_optimizer
from ditjax.train.state import abstract_model, init_train_state
from ditjax.train.step import ema_decay_at, make_train_step


@dataclasses.dataclass(frozen=True)
class Regression:
    """A key-independent objective, so accumulated and full-batch steps must agree."""

    def losses(self, model_fn, x, y, key):
        del key
        out = model_fn(x, jnp.full((x.shape[0],), 10.0), y)
        return {"loss": jnp.mean((out - x) ** 2, axis=(1, 2, 3))}


def build(accum: int, nan_guard: bool = True):
    model_cfg = dit_config("DiT-S/8", input_size=16, in_channels=1, depth=1, hidden_size=32, num_heads=2,
                           num_classes=3, learn_sigma=False, class_dropout_prob=0.0)
    config = base_config()
    config.optim.update(lr=1e-2, grad_clip=1.0)
    config.train.update(grad_accum_steps=accum, ema_decay=0.5, nan_guard=nan_guard)
    tx, schedule = make_optimizer(config.optim, 10)
    mesh, rules = make_mesh(config.mesh), resolve_rules("dp")
    state, shardings = init_train_state(model_cfg, tx, 0, mesh, rules)
    graphdef, abstract_state = abstract_model(model_cfg)
    step, _ = make_train_step(graphdef, abstract_state, Regression(), tx, schedule, config.train, mesh, rules,
                              shardings)
    return state, step


def batch(n: int = 8, value: float | None = None):
    x = np.random.default_rng(0).standard_normal((n, 16, 16, 1)).astype(np.float32)
    if value is not None:
        x[0, 0, 0, 0] = value
    return {"image": jnp.asarray(x), "label": jnp.arange(n, dtype=jnp.int32) % 3}


def test_gradient_accumulation_matches_the_full_batch():
    full, step_full = build(1)
    acc, step_acc = build(2)
    for _ in range(2):  # the first step only trains the zero-initialised output; the second reaches all
        full, m_full = step_full(full, batch())
        acc, m_acc = step_acc(acc, batch())
    np.testing.assert_allclose(m_acc["loss"], m_full["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(acc.params), jax.tree.leaves(full.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # fp32 summation order of two half-batches


def test_ema_follows_its_closed_form():
    state, step = build(1)
    before = jax.tree.map(np.asarray, state.ema)
    new, _ = step(state, batch())
    for e0, p1, e1 in zip(jax.tree.leaves(before), jax.tree.leaves(new.params), jax.tree.leaves(new.ema)):
        np.testing.assert_allclose(e1, 0.5 * e0 + 0.5 * np.asarray(p1), rtol=1e-6, atol=1e-7)


def test_nan_guard_keeps_the_state_and_reports():
    state, step = build(1)
    before = jax.tree.map(np.asarray, state.params)
    new, metrics = step(state, batch(value=np.nan))
    assert not bool(metrics["finite"])
    assert int(new.step) == 0
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(new.params)):
        np.testing.assert_array_equal(a, b)


def test_schedules_and_ema_warmup():
    cfg = ml_collections.ConfigDict(dict(lr=1.0, schedule="warmup_cosine", warmup_steps=10, end_lr=0.1))
    s = learning_rate_schedule(cfg, 110)
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5)
    assert float(s(10)) == pytest.approx(1.0) and float(s(110)) == pytest.approx(0.1)
    assert float(s(60)) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down the cosine
    cfg.schedule = "constant"
    assert float(learning_rate_schedule(cfg, 110)(50)) == 1.0
    assert float(ema_decay_at(jnp.array(0), 0.999, True)) == pytest.approx(0.1)
    assert float(ema_decay_at(jnp.array(10**6), 0.999, True)) == pytest.approx(0.999)
