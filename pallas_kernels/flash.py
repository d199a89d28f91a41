"""Public flash-attention entry points: backend dispatch, head-dim padding and the custom VJP."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import autotune, gpu_kernel, tpu_kernel
from pallas_kernels.common import HEAD_DIM_ALIGN, BlockSizes, check_inputs, default_scale, pad_axis, \
    resolve_backend, round_up

_KERNELS = {"tpu": tpu_kernel, "gpu": gpu_kernel}


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static (hashable) arguments of one kernel call."""

    sm_scale: float
    blocks: BlockSizes
    backend: str
    interpret: Any


def _pad(x: jax.Array, cfg: _Config) -> jax.Array:
    return pad_axis(x, 3, round_up(x.shape[3], HEAD_DIM_ALIGN[cfg.backend]))


def _forward(q, k, v, cfg: _Config):
    out, lse = _KERNELS[cfg.backend].forward(*(_pad(x, cfg) for x in (q, k, v)), sm_scale=cfg.sm_scale,
                                              blocks=cfg.blocks, interpret=cfg.interpret)
    out = out[..., : q.shape[3]]
    # Residuals are the unpadded arrays: padding again in the backward is cheaper than holding
    # padded copies of q, k, v from every layer's forward until its backward.
    return (out, lse), (q, k, v, out, lse)


def _backward(cfg: _Config, res, cotangents):
    q, k, v, out, lse = res
    do, dlse = cotangents
    # delta = rowsum(o * do); an LSE cotangent enters dS = P * (dP - delta + dlse), so fold it in here.
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
    delta = delta - dlse.astype(jnp.float32)
    grads = _KERNELS[cfg.backend].backward(*(_pad(x, cfg) for x in (q, k, v)), lse, delta, _pad(do, cfg),
                                           sm_scale=cfg.sm_scale, blocks=cfg.blocks, interpret=cfg.interpret)
    return tuple(g[..., : q.shape[3]] for g in grads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash(q, k, v, cfg: _Config):
    return _forward(q, k, v, cfg)[0]


_flash.defvjp(_forward, _backward)


def _config(q, k, v, sm_scale, block_sizes, backend, interpret) -> _Config:
    backend = resolve_backend(backend)
    check_inputs(q, k, v, backend)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    if interpret is True and backend == "gpu":
        interpret = gpu_kernel.interpret_params()
    if block_sizes is None:
        block_sizes = autotune.lookup(backend, q.shape, q.dtype)
    scale = default_scale(q.shape[3]) if sm_scale is None else float(sm_scale)
    return _Config(scale, block_sizes, backend, interpret)


def flash_attention_with_lse(q: jax.Array, k: jax.Array, v: jax.Array, *, sm_scale: float | None = None,
                             block_sizes: BlockSizes | None = None, backend: str | None = None,
                             interpret: Any = None) -> tuple[jax.Array, jax.Array]:
    """Non-causal attention on [B, L, H, D]; returns (out [B, L, H, D], lse [B, H, L] float32).

    lse is the natural-log log-sum-exp of each row of the scaled logits S = sm_scale * q k^T, so
    softmax(S) = exp(S - lse[..., None]); both outputs are differentiable. sm_scale defaults to
    1/sqrt(D) with the true head dim. backend: None picks the platform's kernel ('tpu' on CPU),
    or 'gpu' / 'tpu'. interpret: None runs interpret mode on CPU only; True/False, or explicit
    pltpu.InterpretParams / plgpu.InterpretGPUParams. block_sizes: None reads the autotune cache.
    """
    return _flash(q, k, v, _config(q, k, v, sm_scale, block_sizes, backend, interpret))


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, sm_scale: float | None = None,
                    block_sizes: BlockSizes | None = None, backend: str | None = None,
                    interpret: Any = None) -> jax.Array:
    """Non-causal attention on [B, L, H, D] -> [B, L, H, D]; see flash_attention_with_lse."""
    return flash_attention_with_lse(q, k, v, sm_scale=sm_scale, block_sizes=block_sizes, backend=backend,
                                    interpret=interpret)[0]
