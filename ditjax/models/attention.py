"""Multi-head self-attention with one call site and swappable backends.

Backends: ``xla`` (explicit softmax; the reference), ``cudnn`` (``jax.nn.dot_product_attention``'s
cuDNN kernel) and ``pallas`` (our flash kernels in :mod:`pallas_kernels`). A backend that cannot run a
shape or platform falls back to ``xla`` with a logged reason, never silently. Layers whose
pre-softmax logits are requested (HASTE) always use the explicit path, which returns them.
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from flax import nnx

from ditjax.models.layers import Dense, xavier_uniform
from ditjax.parallel.logical import constrain, shard_over_mesh

BACKENDS = ("xla", "cudnn", "pallas")
log = logging.getLogger(__name__)


@functools.cache
def _warn_fallback(backend: str, reason: str) -> None:
    log.warning("attention backend %r unavailable (%s); falling back to 'xla'", backend, reason)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> tuple[jax.Array, jax.Array]:
    """Reference attention on [B, L, H, D]; returns (output, pre-softmax logits [B, H, L, L])."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k,
                        preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v), logits


def _cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array | None:
    if jax.default_backend() != "gpu":
        _warn_fallback("cudnn", f"needs a GPU, running on {jax.default_backend()}")
        return None
    if q.dtype not in (jnp.bfloat16, jnp.float16) or q.shape[-1] % 8 or q.shape[-1] > 256:
        _warn_fallback("cudnn", f"dtype {q.dtype} / head dim {q.shape[-1]} unsupported")
        return None
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")


def _pallas_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array | None:
    import pallas_kernels  # imported lazily: the kernels are optional for the xla path

    platform = jax.default_backend()
    # On CPU the TPU kernel runs in Pallas's interpreter: slow, but the same model runs (and is tested) here.
    ok, reason = pallas_kernels.supports(q.shape, q.dtype, "tpu" if platform == "cpu" else platform)
    if not ok:
        _warn_fallback("pallas", reason)
        return None
    if platform == "cpu":
        _note_once("attention backend 'pallas' on CPU runs the TPU kernel in interpret mode (slow; for testing)")
    kernel = functools.partial(pallas_kernels.flash_attention, sm_scale=scale)
    return shard_over_mesh(kernel, ("batch", "tokens", "heads", "head_dim"))(q, k, v)


@functools.cache
def _note_once(message: str) -> None:
    log.info(message)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, backend: str) -> jax.Array:
    """Dispatch to a backend on [B, L, H, D] inputs, falling back to XLA where it cannot run."""
    out = None
    if backend == "cudnn":
        out = _cudnn_attention(q, k, v, scale)
    elif backend == "pallas":
        out = _pallas_attention(q, k, v, scale)
    elif backend != "xla":
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    return _recomputed_xla_attention(q, k, v, scale) if out is None else out


@functools.partial(jax.checkpoint, static_argnums=(3,))
def _recomputed_xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """XLA attention whose [B, H, L, L] logits and probabilities are recomputed in the backward pass
    instead of stored: one extra QKᵀ per layer (~2% of a DiT's FLOPs) for ~100 MB per layer at batch 32,
    256 tokens, the largest activations the backward pass would keep (flash kernels do the same)."""
    return xla_attention(q, k, v, scale)[0]


class Attention(nnx.Module):
    """timm Attention: fused qkv with bias, softmax scale d_h^-0.5 (overridable for μP), output proj.

    The qkv kernel is stored [D, 3, heads, head_dim] and the projection [heads, head_dim, D] so that
    tensor parallelism shards heads directly.
    """

    def __init__(self, hidden_size: int, num_heads: int, *, rngs: nnx.Rngs, param_dtype: jnp.dtype,
                 dtype: jnp.dtype, backend: str = "xla", scale: float | None = None):
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        head_dim = hidden_size // num_heads
        self.num_heads, self.head_dim, self.backend = num_heads, head_dim, backend
        self.scale = head_dim ** -0.5 if scale is None else scale
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.qkv = Dense(hidden_size, (3, num_heads, head_dim), in_axes=("embed",),
                         out_axes=(None, "heads", "head_dim"),
                         kernel_init=xavier_uniform(hidden_size, 3 * hidden_size), **kw)
        self.proj = Dense((num_heads, head_dim), hidden_size, in_axes=("heads", "head_dim"), out_axes=("embed",),
                          kernel_init=xavier_uniform(hidden_size, hidden_size), **kw)

    def __call__(self, x: jax.Array, return_logits: bool = False) -> tuple[jax.Array, jax.Array | None]:
        qkv = self.qkv(x)  # [B, L, 3, H, Dh]
        q, k, v = (constrain(qkv[:, :, i], ("batch", "tokens", "heads", "head_dim")) for i in range(3))
        if return_logits:
            out, logits = xla_attention(q, k, v, self.scale)
        else:
            out, logits = dot_product_attention(q, k, v, self.scale, self.backend), None
        return self.proj(out), logits
