"""HASTE attention-map alignment helpers (algorithms.md §5) for layers that run the flash kernel.

The flash kernel never writes the [B, H, L, L] probabilities, but its LSE output is all that is
needed to rebuild them exactly: log softmax(S) = S - lse. So a probed layer keeps the fast kernel
for its output and only the alignment loss touches L x L logits, one query chunk at a time.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import default_scale, pad_axis


def _scale(q: jax.Array, sm_scale: float | None) -> float:
    return default_scale(q.shape[3]) if sm_scale is None else float(sm_scale)


def attention_logits(q: jax.Array, k: jax.Array, *, sm_scale: float | None = None) -> jax.Array:
    """Pre-softmax logits S = (q * scale) k^T, [B, L, H, D] x2 -> float32 [B, H, L, L]."""
    return jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32,
                      precision=lax.Precision.HIGHEST) * _scale(q, sm_scale)


def attention_log_probs(q: jax.Array, k: jax.Array, lse: jax.Array, *, sm_scale: float | None = None) -> jax.Array:
    """log softmax(S) [B, H, L, L] from the forward's natural-log LSE [B, H, L], without a new reduction."""
    return attention_logits(q, k, sm_scale=sm_scale) - lse[..., None].astype(jnp.float32)


def attention_ce_loss(q: jax.Array, k: jax.Array, teacher_probs: jax.Array, sm_scale: float | None = None, *,
                      lse: jax.Array | None = None, max_rows: int = 256) -> jax.Array:
    """mean over (b, h, i) of -sum_j T[b,h,i,j] log softmax_j(S[b,h,i,:]), in float32.

    q, k: [B, L, H, D] of one student layer; teacher_probs: [B, H, L, L] (rows sum to 1 for HASTE,
    though nothing here relies on it).

    With `lse` (from flash_attention_with_lse on the same q, k) the loss is linear in S, so no L x L
    logits are formed at all: sum_j T_ij (lse_i - S_ij) = lse_i rowsum(T_i) - scale q_i . (T K)_i,
    and the gradient reaches the LSE through the kernel's VJP. Without it the loss is
    self-contained: query rows are processed `max_rows` at a time under jax.checkpoint, so forward
    and backward hold at most [B, H, max_rows, L] logits instead of a whole layer's.
    """
    b, length, h, _ = q.shape
    if teacher_probs.shape != (b, h, length, length):
        raise ValueError(f"teacher_probs must be {(b, h, length, length)}, got {teacher_probs.shape}")
    scale = _scale(q, sm_scale)
    t = teacher_probs.astype(jnp.float32)
    if lse is not None:
        tk = jnp.einsum("bhqk,bkhd->bqhd", t, k.astype(jnp.float32), precision=lax.Precision.HIGHEST)
        dot = jnp.einsum("bqhd,bqhd->bhq", q.astype(jnp.float32), tk, precision=lax.Precision.HIGHEST)
        return jnp.mean(lse.astype(jnp.float32) * t.sum(axis=-1) - scale * dot)

    rows = min(length, max_rows)
    n = -(-length // rows)
    # Zero-padded query rows have all-zero teacher rows, so they add exactly nothing.
    q_chunks = pad_axis(q, 1, n * rows).reshape(b, n, rows, h, -1).transpose(1, 0, 2, 3, 4)
    t_chunks = pad_axis(t, 2, n * rows).reshape(b, h, n, rows, length).transpose(2, 0, 1, 3, 4)

    @jax.checkpoint
    def chunk_loss(args) -> jax.Array:
        q_c, t_c = args
        return -jnp.sum(t_c * jax.nn.log_softmax(attention_logits(q_c, k, sm_scale=scale), axis=-1))

    return jnp.sum(lax.map(chunk_loss, (q_chunks, t_chunks))) / (b * h * length)
