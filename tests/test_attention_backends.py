"""The DiT attention backends: `pallas` (interpret mode here) equals `xla` in loss and gradients;
unsupported backends fall back to XLA with a logged reason."""
from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ditjax.models import DiT, dit_config


def loss_and_grads(backend: str):
    cfg = dit_config("DiT-S/8", input_size=16, depth=2, hidden_size=72, num_heads=1, num_classes=4,
                     attention_backend=backend)  # head dim 72 (DiT-XL's), 4 tokens
    model = DiT(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    state = jax.tree.unflatten(tree, [0.1 * jax.random.normal(k, a.shape) for k, a in zip(keys, leaves)])
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 16, 16, 4))
    t, y = jnp.array([3.0, 500.0, 999.0]), jnp.array([0, 1, 3])

    def loss(s):
        return jnp.mean(nnx.merge(graphdef, s)(x, t, y).output ** 2)

    return jax.value_and_grad(loss)(state)


def test_pallas_backend_matches_xla_in_loss_and_gradients():
    loss_x, grads_x = loss_and_grads("xla")
    loss_p, grads_p = loss_and_grads("pallas")
    # fp32 kernel vs explicit softmax: both accumulate in fp32; differences are reduction order (~1e-7 rel).
    np.testing.assert_allclose(loss_p, loss_x, rtol=1e-5)
    for gx, gp in zip(jax.tree.leaves(grads_x), jax.tree.leaves(grads_p)):
        scale = float(jnp.max(jnp.abs(gx))) or 1.0
        assert float(jnp.max(jnp.abs(gp - gx))) <= 1e-5 * scale


def test_cudnn_on_cpu_falls_back_to_xla_with_a_logged_reason(caplog):
    with caplog.at_level(logging.WARNING, logger="ditjax.models.attention"):
        loss_c, _ = loss_and_grads("cudnn")
    loss_x, _ = loss_and_grads("xla")
    assert float(loss_c) == float(loss_x)
    assert any("'cudnn' unavailable" in r.getMessage() for r in caplog.records) or _already_warned()


def _already_warned() -> bool:
    from ditjax.models.attention import _warn_fallback
    return _warn_fallback.cache_info().currsize > 0
