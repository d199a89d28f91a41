"""The MLP slot of a DiT block: a dense MLP, or (by config) a mixture of experts.

Every slot returns ``(output, aux_loss)`` so that MoE load-balancing losses flow to the train step
without special cases; the dense MLP's auxiliary loss is zero.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ditjax.models.layers import Dense


class Mlp(nnx.Module):
    """timm Mlp: fc1 → GELU(tanh) → fc2."""

    def __init__(self, hidden_size: int, mlp_hidden: int, *, rngs: nnx.Rngs, param_dtype: jnp.dtype,
                 dtype: jnp.dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.fc1 = Dense(hidden_size, mlp_hidden, in_axes=("embed",), out_axes=("mlp",), **kw)
        self.fc2 = Dense(mlp_hidden, hidden_size, in_axes=("mlp",), out_axes=("embed",), **kw)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.fc2(_gelu(self.fc1(x))), jnp.zeros((), jnp.float32)


@jax.checkpoint
def _gelu(h: jax.Array) -> jax.Array:
    """tanh-GELU whose output the backward pass recomputes from its input rather than stores: one
    elementwise pass saves an [B, T, mlp_hidden] activation per layer."""
    return jax.nn.gelu(h, approximate=True)


MLP_TYPES = {"dense": Mlp}


def make_mlp(kind: str, hidden_size: int, mlp_hidden: int, *, rngs: nnx.Rngs, param_dtype: jnp.dtype,
             dtype: jnp.dtype) -> nnx.Module:
    """Fill the MLP slot; new kinds (e.g. ``moe``) register in MLP_TYPES."""
    if kind not in MLP_TYPES:
        raise ValueError(f"unknown mlp_type {kind!r}; choose one of {sorted(MLP_TYPES)}")
    return MLP_TYPES[kind](hidden_size, mlp_hidden, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
