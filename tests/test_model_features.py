"""Model options later features rely on: remat, captured hidden states and attention logits, label drop."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ditjax.models import DiT, dit_config


def random_model(**overrides):
    cfg = dit_config("DiT-S/8", input_size=16, depth=3, hidden_size=64, num_heads=4, num_classes=5, **overrides)
    model = DiT(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    return graphdef, jax.tree.unflatten(tree, [0.1 * jax.random.normal(k, a.shape) for k, a in zip(keys, leaves)])


X = jax.random.normal(jax.random.PRNGKey(2), (2, 16, 16, 4))
T, Y = jnp.array([10.0, 900.0]), jnp.array([1, 4])


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
@pytest.mark.parametrize("scan", [False, True])
def test_remat_changes_memory_not_numbers(policy, scan):
    def grads(p):
        graphdef, state = random_model(remat_policy=p, scan_layers=scan)
        return jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(X, T, Y).output ** 2))(state)

    # Recomputation reorders fp32 sums: compare each gradient relative to its own scale (max |g|).
    for a, b in zip(jax.tree.leaves(grads("none")), jax.tree.leaves(grads(policy))):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * max(float(jnp.max(jnp.abs(a))), 1e-12)


@pytest.mark.parametrize("scan", [False, True])
def test_captured_hidden_states_and_logits_are_the_blocks_own(scan):
    graphdef, state = random_model(scan_layers=scan)
    model = nnx.merge(graphdef, state)
    out = model(X, T, Y, capture_hidden=(0, 2), capture_logits=(1,))
    plain = model(X, T, Y)
    np.testing.assert_allclose(out.output, plain.output, rtol=1e-6, atol=1e-6)  # capturing changes nothing
    assert sorted(out.hidden) == [0, 2] and out.hidden[2].shape == (2, 4, 64)
    # Recompute block 1's logits by hand from the captured input of block 1 (the output of block 0).
    unscanned = nnx.merge(*nnx.split(DiT(dataclasses.replace(model.cfg, scan_layers=False), rngs=nnx.Rngs(0))))
    if scan:
        from ditjax.convert.pytorch_dit import from_torch, to_torch
        params = from_torch(to_torch(nnx.to_pure_dict(state), model.cfg),
                            dataclasses.replace(model.cfg, scan_layers=False))
    else:
        params = nnx.to_pure_dict(state)
    st = nnx.state(unscanned)
    nnx.replace_by_pure_dict(st, params)
    nnx.update(unscanned, st)
    c = unscanned.t_embedder(T) + unscanned.y_embedder(Y)
    block = unscanned.blocks[1]
    shift, scale = jnp.split(block.modulation(nnx.silu(c)), 6, axis=-1)[:2]
    from ditjax.models.layers import layer_norm, modulate
    qkv = block.attn.qkv(modulate(layer_norm(out.hidden[0]), shift, scale))
    want = jnp.einsum("bqhd,bkhd->bhqk", qkv[:, :, 0] * block.attn.scale, qkv[:, :, 1])
    np.testing.assert_allclose(out.attn_logits[1], want, rtol=1e-5, atol=1e-5)


def test_label_drop_uses_the_null_class_at_the_given_rate():
    graphdef, state = random_model(class_dropout_prob=0.5)
    model = nnx.merge(graphdef, state)
    y = jnp.zeros((4000,), jnp.int32)
    dropped = model.y_embedder.drop(y, jax.random.PRNGKey(0), None)
    assert set(np.unique(dropped)) == {0, 5}
    assert abs(float(jnp.mean(dropped == 5)) - 0.5) < 0.03  # 4000 Bernoulli(0.5): sd 0.008
    forced = model.y_embedder.drop(y[:3], None, jnp.array([1, 0, 1]))
    assert forced.tolist() == [5, 0, 5]
    assert model.y_embedder.drop(y[:3], None, None).tolist() == [0, 0, 0]  # no key: evaluation, no drop
