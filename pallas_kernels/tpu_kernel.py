"""Flash attention for TPU (Mosaic TPU via pl.pallas_call), forward plus dQ and dK/dV kernels.

Inputs arrive as [B, L, H, Dp] with Dp a multiple of 128; they are viewed (free reshape) as
[B, L, H*Dp] so a (block, Dp) tile of one head is a lane-aligned block of that 2-D slab, which
avoids transposing to [B, H, L, D]. The LSE and delta rows live in [B, H, 1, L] arrays so their
(1, block) tiles satisfy the (8, 128) tiling rule for any H.

A ragged L (not a multiple of the block) uses the cdiv grid: edge blocks read undefined rows
(NaN in interpret mode), so every kernel zeroes out-of-range K/V (or Q/dO) rows and masks their
logits before they can reach a valid row; out-of-range output rows are dropped by Pallas.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import BlockSizes, round_up

LANES = 128
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b
_SEMANTICS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _dot(a: jax.Array, b: jax.Array, dims, precision) -> jax.Array:
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _precision(dtype) -> lax.Precision:
    """fp32 inputs need full-precision MXU passes to meet a 1e-5 contract; bf16 is exact already."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _valid(start: jax.Array, shape: tuple[int, int], axis: int, seq_len: int) -> jax.Array:
    """Mask of a tile whose `axis` starts at sequence position `start`: True inside the sequence.

    Built at the tile's full shape: Mosaic broadcasts boolean vectors poorly.
    """
    return start + lax.broadcasted_iota(jnp.int32, shape, axis) < seq_len


def _kv_block_logits(q_ref, k_ref, v_ref, kv_start: jax.Array, *, sm_scale: float, seq_len: int, ragged: bool,
                     precision) -> tuple[jax.Array, jax.Array, jax.Array]:
    """This K/V block (rows past ``seq_len`` zeroed, so padding never reaches a valid row) and the
    scaled logits of the Q block against it (columns past ``seq_len`` at -inf)."""
    k, v = k_ref[...], v_ref[...]
    if ragged:
        rows_ok = _valid(kv_start, k.shape, 0, seq_len)
        k, v = jnp.where(rows_ok, k, 0), jnp.where(rows_ok, v, 0)
    s = _dot(q_ref[...], k, NT, precision) * sm_scale
    if ragged:
        s = jnp.where(_valid(kv_start, s.shape, 1, seq_len), s, -jnp.inf)
    return k, v, s


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr, *,
                sm_scale: float, seq_len: int, ragged: bool, precision):
    j = pl.program_id(3)
    block_kv = k_ref.shape[0]

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full_like(m_scr, -jnp.inf)
        l_scr[...] = jnp.zeros_like(l_scr)
        acc_scr[...] = jnp.zeros_like(acc_scr)

    k, v, s = _kv_block_logits(q_ref, k_ref, v_ref, j * block_kv, sm_scale=sm_scale, seq_len=seq_len,
                               ragged=ragged, precision=precision)
    # m and l are kept lane-replicated (block_q, 128): the layout Mosaic broadcasts cheaply.
    m_prev = m_scr[...]
    m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_next)
    p = jnp.exp(s - m_next[:, :1])
    l_scr[...] = alpha * l_scr[...] + p.sum(axis=1, keepdims=True)
    m_scr[...] = m_next
    acc_scr[...] = acc_scr[...] * alpha[:, :1] + _dot(p.astype(v.dtype), v, NN, precision)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        l = l_scr[...]
        o_ref[...] = (acc_scr[...] / l[:, :1]).astype(o_ref.dtype)
        lse = m_scr[...] + jnp.log(l)
        lse_ref[...] = lse.T[:1]  # an aligned transpose turns the column into a lane row


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, acc_scr, *,
               sm_scale: float, seq_len: int, ragged: bool, precision):
    j = pl.program_id(3)
    block_kv = k_ref.shape[0]

    @pl.when(j == 0)
    def _init():
        acc_scr[...] = jnp.zeros_like(acc_scr)

    k, v, s = _kv_block_logits(q_ref, k_ref, v_ref, j * block_kv, sm_scale=sm_scale, seq_len=seq_len,
                               ragged=ragged, precision=precision)
    p = jnp.exp(s - lse_ref[0][:, None])
    dp = _dot(do_ref[...], v, NT, precision)
    ds = p * (dp - delta_ref[0][:, None])
    acc_scr[...] += _dot(ds.astype(k.dtype), k, NN, precision)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (acc_scr[...] * sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_scr, dv_scr, *,
                sm_scale: float, seq_len: int, ragged: bool, precision):
    """Works on transposed logits S^T [kv, q], so the per-query LSE/delta rows broadcast for free."""
    i = pl.program_id(3)
    block_q = q_ref.shape[0]

    @pl.when(i == 0)
    def _init():
        dk_scr[...] = jnp.zeros_like(dk_scr)
        dv_scr[...] = jnp.zeros_like(dv_scr)

    q, do = q_ref[...], do_ref[...]
    if ragged:
        rows_ok = _valid(i * block_q, q.shape, 0, seq_len)
        q, do = jnp.where(rows_ok, q, 0), jnp.where(rows_ok, do, 0)
    k, v = k_ref[...], v_ref[...]
    s_t = _dot(k, q, NT, precision) * sm_scale
    p_t = jnp.exp(s_t - lse_ref[...])
    dp_t = _dot(v, do, NT, precision)
    ds_t = p_t * (dp_t - delta_ref[...])
    if ragged:  # padded queries carry undefined LSE/delta: drop their columns entirely
        cols_ok = _valid(i * block_q, s_t.shape, 1, seq_len)
        p_t, ds_t = jnp.where(cols_ok, p_t, 0.0), jnp.where(cols_ok, ds_t, 0.0)
    dv_scr[...] += _dot(p_t.astype(do.dtype), do, NN, precision)
    dk_scr[...] += _dot(ds_t.astype(q.dtype), q, NN, precision)

    @pl.when(i == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = (dk_scr[...] * sm_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _tile(block: int, seq_len: int) -> int:
    """A requested block, shrunk to the (128-rounded) sequence so tiny inputs use one block."""
    if block % LANES:
        raise ValueError(f"TPU block sizes must be multiples of {LANES}, got {block}")
    return min(block, round_up(seq_len, LANES))


def _head_spec(block: int, head_dim: int, seq_axis: int) -> pl.BlockSpec:
    """Tile of one head of a [B, L, H*Dp] slab; `seq_axis` picks which grid index walks L."""
    return pl.BlockSpec((None, block, head_dim), lambda b, h, i, j: (b, (i, j)[seq_axis], h))


def _row_spec(block: int, seq_axis: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, None, 1, block), lambda b, h, i, j: (b, h, 0, (i, j)[seq_axis]))


def _cost(b: int, h: int, length: int, d: int, matmuls: int, itemsize: int, tensors: int) -> pl.CostEstimate:
    return pl.CostEstimate(flops=2 * matmuls * b * h * length * length * d,
                           transcendentals=b * h * length * length,
                           bytes_accessed=tensors * b * length * h * d * itemsize)


def forward(q: jax.Array, k: jax.Array, v: jax.Array, *, sm_scale: float, blocks: BlockSizes,
            interpret: Any) -> tuple[jax.Array, jax.Array]:
    """[B, L, H, Dp] inputs -> (out [B, L, H, Dp], lse [B, H, L] float32, natural log)."""
    b, length, h, d = q.shape
    bq, bk = _tile(blocks.block_q, length), _tile(blocks.block_kv, length)
    kernel = functools.partial(_fwd_kernel, sm_scale=sm_scale, seq_len=length,
                               ragged=bool(length % bk), precision=_precision(q.dtype))
    out, lse = pl.pallas_call(
        kernel,
        grid=(b, h, pl.cdiv(length, bq), pl.cdiv(length, bk)),
        in_specs=[_head_spec(bq, d, 0), _head_spec(bk, d, 1), _head_spec(bk, d, 1)],
        out_specs=[_head_spec(bq, d, 0), _row_spec(bq, 0)],
        out_shape=[jax.ShapeDtypeStruct((b, length, h * d), q.dtype),
                   jax.ShapeDtypeStruct((b, h, 1, length), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                        pltpu.VMEM((bq, d), jnp.float32)],
        compiler_params=_SEMANTICS,
        cost_estimate=_cost(b, h, length, d, 2, q.dtype.itemsize, 4),
        interpret=interpret,
        name="ditjax_flash_fwd_tpu",
    )(*(x.reshape(b, length, h * d) for x in (q, k, v)))
    return out.reshape(q.shape), lse.reshape(b, h, length)


def backward(q: jax.Array, k: jax.Array, v: jax.Array, lse: jax.Array, delta: jax.Array,
             do: jax.Array, *, sm_scale: float, blocks: BlockSizes,
             interpret: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """dQ, dK, dV for [B, L, H, Dp] inputs given the forward LSE and delta=rowsum(o*do), [B, H, L]."""
    b, length, h, d = q.shape
    q2, k2, v2, do2 = (x.reshape(b, length, h * d) for x in (q, k, v, do))
    lse4, delta4 = lse.reshape(b, h, 1, length), delta.reshape(b, h, 1, length)
    precision = _precision(q.dtype)
    slab = jax.ShapeDtypeStruct((b, length, h * d), q.dtype)

    bq, bk = _tile(blocks.block_q_dq, length), _tile(blocks.block_kv_dq, length)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, sm_scale=sm_scale, seq_len=length, ragged=bool(length % bk),
                          precision=precision),
        grid=(b, h, pl.cdiv(length, bq), pl.cdiv(length, bk)),
        in_specs=[_head_spec(bq, d, 0), _head_spec(bk, d, 1), _head_spec(bk, d, 1), _head_spec(bq, d, 0),
                  _row_spec(bq, 0), _row_spec(bq, 0)],
        out_specs=_head_spec(bq, d, 0),
        out_shape=slab,
        scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        compiler_params=_SEMANTICS,
        cost_estimate=_cost(b, h, length, d, 3, q.dtype.itemsize, 5),
        interpret=interpret,
        name="ditjax_flash_dq_tpu",
    )(q2, k2, v2, do2, lse4, delta4)

    bq, bk = _tile(blocks.block_q_dkv, length), _tile(blocks.block_kv_dkv, length)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, sm_scale=sm_scale, seq_len=length, ragged=bool(length % bq),
                          precision=precision),
        grid=(b, h, pl.cdiv(length, bk), pl.cdiv(length, bq)),
        in_specs=[_head_spec(bq, d, 1), _head_spec(bk, d, 0), _head_spec(bk, d, 0), _head_spec(bq, d, 1),
                  _row_spec(bq, 1), _row_spec(bq, 1)],
        out_specs=[_head_spec(bk, d, 0), _head_spec(bk, d, 0)],
        out_shape=[slab, slab],
        scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        compiler_params=_SEMANTICS,
        cost_estimate=_cost(b, h, length, d, 4, q.dtype.itemsize, 6),
        interpret=interpret,
        name="ditjax_flash_dkv_tpu",
    )(q2, k2, v2, do2, lse4, delta4)
    return dq.reshape(q.shape), dk.reshape(q.shape), dv.reshape(q.shape)
