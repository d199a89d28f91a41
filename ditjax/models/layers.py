"""Parameter-creating primitives shared by every model.

Each parameter is an ``nnx.Param`` with an ``axes`` metadata tuple (logical axis names). Sharding
rules (:mod:`ditjax.parallel`) and μP (:mod:`ditjax.mup`) read that metadata, so the model code never
mentions meshes or optimizers.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def xavier_uniform(fan_in: int, fan_out: int) -> Initializer:
    """torch.nn.init.xavier_uniform_ on the 2-D [fan_out, fan_in] view, whatever the stored shape."""
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -limit, limit)


def normal(std: float) -> Initializer:
    return lambda key, shape, dtype: std * jax.random.normal(key, shape, dtype)


def zeros(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype) -> jax.Array:
    del key
    return jnp.zeros(shape, dtype)


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], axes: tuple[str | None, ...],
          dtype: jnp.dtype) -> nnx.Param:
    """Create a parameter annotated with its logical axes."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {tuple(shape)}")
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), axes=tuple(axes))


class Dense(nnx.Module):
    """y = x @ kernel + bias with the kernel stored [..in, ..out] and cast to the compute dtype.

    ``in_shape``/``out_shape`` allow multi-dimensional kernels (e.g. [D, 3, heads, head_dim]) so that
    tensor parallelism can shard heads without reshapes in the state.
    """

    def __init__(self, in_shape: int | Sequence[int], out_shape: int | Sequence[int], *,
                 in_axes: tuple[str | None, ...], out_axes: tuple[str | None, ...], rngs: nnx.Rngs,
                 kernel_init: Initializer | None = None, use_bias: bool = True,
                 param_dtype: jnp.dtype = jnp.float32, dtype: jnp.dtype = jnp.float32):
        in_shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
        out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
        fan_in, fan_out = math.prod(in_shape), math.prod(out_shape)
        init = kernel_init or xavier_uniform(fan_in, fan_out)
        self.kernel = param(rngs, init, in_shape + out_shape, in_axes + out_axes, param_dtype)
        self.bias = param(rngs, zeros, out_shape, out_axes, param_dtype) if use_bias else None
        self.n_in = len(in_shape)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        contract = tuple(range(x.ndim - self.n_in, x.ndim))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel, ((contract, tuple(range(self.n_in))), ((), ())))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine (DiT's elementwise_affine=False), statistics in float32.

    The means are mat-vecs with a 1/D vector rather than reductions: XLA:CPU rewrites a row
    reduction into a tree of slow reduce-windows, in the forward and the backward pass, while a
    dot goes to oneDNN (~5% of the default config's bf16 step, within run-to-run noise). HIGHEST
    precision keeps them exact float32 sums where a backend would use bf16 or TF32 passes.
    """
    x32 = x.astype(jnp.float32)
    mean_vec = jnp.full((x.shape[-1], 1), 1.0 / x.shape[-1], jnp.float32)
    mean = jnp.matmul(x32, mean_vec, precision=jax.lax.Precision.HIGHEST)
    centred = x32 - mean
    var = jnp.matmul(jnp.square(centred), mean_vec, precision=jax.lax.Precision.HIGHEST)
    return (centred * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN modulation broadcast over tokens: x·(1+scale)+shift."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]
