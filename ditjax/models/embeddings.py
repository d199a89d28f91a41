"""Input embeddings of DiT: patches, fixed 2-D sin-cos positions, timesteps and class labels."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ditjax.models.layers import Dense, normal, param, xavier_uniform

TIMESTEP_FREQ_DIM = 256


def sincos_pos_embed_2d(hidden_size: int, grid_size: int) -> np.ndarray:
    """MAE/DiT fixed positions [grid², D] in float64: first D/2 dims encode the column, last D/2 the row."""
    if hidden_size % 4:
        raise ValueError(f"hidden_size {hidden_size} must be divisible by 4 for 2-D sin-cos positions")
    coords = np.arange(grid_size, dtype=np.float64)
    col, row = np.meshgrid(coords, coords)  # col varies along a row: token k = i*g + j has col j

    def encode(pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(hidden_size // 4, dtype=np.float64) / (hidden_size / 4.0))
        angles = pos.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([encode(col), encode(row)], axis=1)


def timestep_embedding(t: jax.Array, dim: int = TIMESTEP_FREQ_DIM, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal timestep features, cos first (DiT's TimestepEmbedder), always in float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class PatchEmbed(nnx.Module):
    """Conv(kernel=stride=p) as a matmul on (row, col, channel)-ordered patches."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int, *, rngs: nnx.Rngs,
                 param_dtype: jnp.dtype, dtype: jnp.dtype):
        self.patch_size = patch_size
        fan_in = patch_size * patch_size * in_channels
        self.proj = Dense(fan_in, hidden_size, in_axes=(None,), out_axes=("embed",), rngs=rngs,
                          kernel_init=xavier_uniform(fan_in, hidden_size), param_dtype=param_dtype, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        p = self.patch_size
        x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return self.proj(x.reshape(b, (h // p) * (w // p), p * p * c))


class TimestepEmbedder(nnx.Module):
    """Sinusoid → Linear → SiLU → Linear, weights N(0, 0.02²) as in DiT."""

    def __init__(self, hidden_size: int, *, rngs: nnx.Rngs, param_dtype: jnp.dtype, dtype: jnp.dtype):
        kw = dict(rngs=rngs, kernel_init=normal(0.02), param_dtype=param_dtype, dtype=dtype)
        self.mlp_in = Dense(TIMESTEP_FREQ_DIM, hidden_size, in_axes=(None,), out_axes=("mlp",), **kw)
        self.mlp_out = Dense(hidden_size, hidden_size, in_axes=("mlp",), out_axes=("embed",), **kw)

    def __call__(self, t: jax.Array) -> jax.Array:
        return self.mlp_out(nnx.silu(self.mlp_in(timestep_embedding(t))))


class LabelEmbedder(nnx.Module):
    """Class table with one extra row (index ``num_classes``) for the unconditional "null" label."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float, *, rngs: nnx.Rngs,
                 param_dtype: jnp.dtype, dtype: jnp.dtype):
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.dtype = dtype
        self.embedding_table = param(rngs, normal(0.02), (num_classes + 1, hidden_size), ("vocab", "embed"),
                                     param_dtype)

    def drop(self, y: jax.Array, key: jax.Array | None, force_drop_ids: jax.Array | None) -> jax.Array:
        """Replace labels by the null class: randomly at train time (``key``) or where forced."""
        if force_drop_ids is not None:
            return jnp.where(force_drop_ids == 1, self.num_classes, y)
        if key is not None and self.dropout_prob > 0:
            return jnp.where(jax.random.bernoulli(key, self.dropout_prob, y.shape), self.num_classes, y)
        return y

    def __call__(self, y: jax.Array) -> jax.Array:
        return jnp.take(self.embedding_table[...], y, axis=0).astype(self.dtype)
