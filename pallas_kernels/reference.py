"""The one float64 reference both kernels (and the HASTE loss) are tested against.

Plain NumPy in float64, so it is independent of jax's matmul precision flags and of x64 mode;
gradients are written out by hand from the softmax Jacobian rather than taken by autodiff, so the
kernels' backward is checked against an independent derivation.
"""
from __future__ import annotations

import numpy as np


def _f64(*xs) -> list[np.ndarray]:
    return [np.asarray(x, dtype=np.float64) for x in xs]


def attention(q, k, v, sm_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Returns (out [B, L, H, D], lse [B, H, L]) with lse the natural-log row log-sum-exp of S."""
    q, k, v = _f64(q, k, v)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * sm_scale
    m = s.max(axis=-1, keepdims=True)
    e = np.exp(s - m)
    denom = e.sum(axis=-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", e / denom, v)
    return out, (m + np.log(denom))[..., 0]


def attention_vjp(q, k, v, do, dlse, sm_scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dq, dk, dv) of (out, lse) = attention(q, k, v) for cotangents do [B, L, H, D], dlse [B, H, L].

    d lse_i / d S_ij = P_ij, so an LSE cotangent adds dlse_i * P_ij to dS.
    """
    q, k, v, do, dlse = _f64(q, k, v, do, dlse)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * sm_scale
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    dv = np.einsum("bhqk,bqhd->bkhd", p, do)
    dp = np.einsum("bqhd,bkhd->bhqk", do, v)
    ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True) + dlse[..., None])
    dq = np.einsum("bhqk,bkhd->bqhd", ds, k) * sm_scale
    dk = np.einsum("bhqk,bqhd->bkhd", ds, q) * sm_scale
    return dq, dk, dv


def attention_ce(q, k, teacher_probs, sm_scale: float) -> float:
    """HASTE attention-map loss: mean over (b, h, row) of -sum_j T_ij log softmax_j(S_i)."""
    q, k, t = _f64(q, k, teacher_probs)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * sm_scale
    m = s.max(axis=-1, keepdims=True)
    log_p = s - m - np.log(np.exp(s - m).sum(axis=-1, keepdims=True))
    return float(-(t * log_p).sum(axis=-1).mean())
