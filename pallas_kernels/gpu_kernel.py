"""Flash attention for Hopper GPUs in Mosaic GPU (plgpu.kernel, TMA + wgmma), forward, dQ and dK/dV.

Why this shape: in jax 0.12 a plain pl.pallas_call lowers on GPU only through the deprecated
Triton backend, so the kernels use plgpu.kernel. Each CTA runs three warpgroups: one streams
K/V (forward, dQ) or Q/dO (dK/dV) through a multi-stage TMA pipeline
(plgpu.emit_pipeline_warp_specialized) and two compute warpgroups each own 64 resident rows.

The second matmul of each step takes its left operand (P or dS) from shared memory, not
registers: both work on hardware, but only the shared-memory form runs in the Mosaic GPU
interpreter, and one code path that is tested on CPU beats a faster untested one. Operands of
one wgmma must share a swizzle, so P/dS tiles use the head dim's swizzle.

Inputs arrive [B, L, H, Dp] with Dp a multiple of 16; L is zero-padded here to the CTA tile and
padded keys are masked in the forward. The backward needs no mask: padded K/V/Q/dO rows are zero,
so they add nothing to valid rows, and the padded output rows are sliced off.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.common import LOG2E, BlockSizes, pad_axis, round_up

WGMMA_ROWS = 64  # rows of one warpgroup's wgmma
COMPUTE_WGS = 2
MEMORY_REGISTERS = 40
SMEM_BUDGET = 227 * 1024 - 4096  # H100/H200 per-block maximum, less room for barriers and reductions
_ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per row of a WGMMA tile
_COL = plgpu.Layout.WGMMA.reduce(0)  # one value per column


def interpret_params() -> plgpu.InterpretGPUParams:
    """Mosaic GPU interpret mode (simulated SMEM, barriers, TMA and wgmma) for running on CPU."""
    return plgpu.InterpretGPUParams()


def _smem_bytes(blocks: BlockSizes, head_dim: int, itemsize: int) -> dict[str, int]:
    """Shared memory each kernel allocates: resident tiles per warpgroup plus the pipeline stages."""
    rows, wgs, stages = WGMMA_ROWS, COMPUTE_WGS, blocks.num_stages
    tile = lambda r, c: r * c * itemsize  # noqa: E731
    return {
        "forward": wgs * (tile(rows, head_dim) + tile(rows, blocks.block_kv) + 4 * rows)
        + stages * 2 * tile(blocks.block_kv, head_dim),
        "dq": wgs * (2 * tile(rows, head_dim) + tile(rows, blocks.block_kv_dq) + 8 * rows)
        + stages * 2 * tile(blocks.block_kv_dq, head_dim),
        "dkv": wgs * (2 * tile(rows, head_dim) + tile(rows, blocks.block_q_dkv))
        + stages * (2 * tile(blocks.block_q_dkv, head_dim) + 8 * blocks.block_q_dkv),
    }


def _check_blocks(blocks: BlockSizes, head_dim: int, itemsize: int) -> None:
    for name in ("block_q", "block_q_dq", "block_kv_dkv"):
        if getattr(blocks, name) != WGMMA_ROWS:
            raise ValueError(f"GPU {name} must be {WGMMA_ROWS} (the rows of one warpgroup), "
                             f"got {getattr(blocks, name)}")
    for name in ("block_kv", "block_kv_dq", "block_q_dkv"):
        size = getattr(blocks, name)
        if size % 64 or not 64 <= size <= 256:
            raise ValueError(f"GPU {name} must be a multiple of 64 in [64, 256], got {size}")
    if blocks.num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {blocks.num_stages}")
    for kernel, size in _smem_bytes(blocks, head_dim, itemsize).items():
        if size > SMEM_BUDGET:
            raise ValueError(f"{blocks} needs {size} bytes of shared memory in the {kernel} kernel at head dim "
                             f"{head_dim}; the budget is {SMEM_BUDGET}")


def _seq_multiple(blocks: BlockSizes) -> int:
    """L is padded to this so every kernel's grid and pipeline tile it exactly."""
    sizes = (COMPUTE_WGS * WGMMA_ROWS, blocks.block_kv, blocks.block_kv_dq, blocks.block_q_dkv)
    return functools.reduce(math.lcm, sizes)


def _transforms(head_dim: int, dtype) -> tuple[Any, ...]:
    swizzle = plgpu.find_swizzle(head_dim * jnp.dtype(dtype).itemsize * 8)
    return plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle)


def _bcast_rows(x: jax.Array, shape: tuple[int, int]) -> jax.Array:
    return lax.broadcast_in_dim(x, shape, [0])


def _bcast_cols(x: jax.Array, shape: tuple[int, int]) -> jax.Array:
    return lax.broadcast_in_dim(x, shape, [1])


def _matmul(a_smem, b_smem, shape: tuple[int, int]) -> jax.Array:
    """a @ b into a fresh fp32 accumulator; reading it waits for the wgmma to finish."""
    def body(acc):
        plgpu.wgmma(acc, a_smem, b_smem)
        return acc[...]
    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _pipeline(step, compute, steps: int, blocks: BlockSizes, in_specs):
    """The warp-specialized TMA pipeline: the last warpgroup streams `in_specs` tiles, the others compute."""
    return plgpu.emit_pipeline_warp_specialized(
        step, grid=(steps,), memory_registers=MEMORY_REGISTERS, wg_axis="wg", num_compute_wgs=COMPUTE_WGS,
        max_concurrent_steps=min(blocks.num_stages, steps), compute_context=compute, in_specs=in_specs)


def _launch(kernel, out_type, scratch, grid: tuple[int, int, int], seq_name: str, interpret: Any):
    return plgpu.kernel(kernel, out_type=out_type, scratch_types=scratch, grid=grid,
                        grid_names=("heads", seq_name, "batch"), num_threads=COMPUTE_WGS + 1, thread_name="wg",
                        compiler_params=plgpu.CompilerParams(approx_math=True), interpret=interpret)


def _fwd(q, k, v, *, sm_scale: float, seq_len: int, blocks: BlockSizes, interpret: Any):
    b, lp, h, d = q.shape
    bq, bkv, dtype = WGMMA_ROWS, blocks.block_kv, q.dtype
    tr = _transforms(d, dtype)
    scale2 = sm_scale * LOG2E  # exp2 with pre-scaled logits saves one multiply per element
    ragged = lp != seq_len

    def kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, qo_smem, p_smem, lse_smem, q_bar):
        bi, hi, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
        row0 = lax.axis_index("q_seq") * (COMPUTE_WGS * bq) + wg * bq
        q_s, p_s = qo_smem.at[wg], p_smem.at[wg]

        def compute(pipeline):
            plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(row0, bq), hi], q_s, q_bar.at[wg])
            plgpu.barrier_wait(q_bar.at[wg])
            acc = plgpu.layout_cast(jnp.zeros((bq, d), jnp.float32), plgpu.Layout.WGMMA)
            m = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), _ROW)
            l = plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), _ROW)
            acc, m, l = pipeline((acc, m, l))
            q_s[...] = (acc / _bcast_rows(l, acc.shape)).astype(dtype)
            lse_smem.at[wg][...] = (m + jnp.log2(l)) * (1 / LOG2E)  # natural log, like jax.nn.logsumexp
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_s, o_ref.at[bi, pl.ds(row0, bq), hi])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[bi, hi, pl.ds(row0, bq)])
            plgpu.wait_smem_to_gmem(0)

        def step(idx, k_s, v_s, carry):
            acc, m, l = carry
            s = _matmul(q_s, k_s.transpose((1, 0)), (bq, bkv)) * scale2
            if ragged:
                col = idx[0] * bkv + plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
                s = jnp.where(col < seq_len, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - _bcast_rows(m_new, s.shape))
            p_s[...] = p.astype(dtype)
            plgpu.commit_smem()
            acc = acc * _bcast_rows(alpha, acc.shape) + _matmul(p_s, v_s, (bq, d))
            return acc, m_new, l * alpha + p.sum(axis=1)

        kv_spec = plgpu.BlockSpec((bkv, d), lambda i: (i, 0), transforms=tr)
        _pipeline(step, compute, lp // bkv, blocks, [kv_spec] * 2)(k_ref.at[bi, :, hi, :], v_ref.at[bi, :, hi, :])

    scratch = [plgpu.SMEM((COMPUTE_WGS, bq, d), dtype, transforms=tr),
               plgpu.SMEM((COMPUTE_WGS, bq, bkv), dtype, transforms=tr),
               plgpu.SMEM((COMPUTE_WGS, bq), jnp.float32),
               plgpu.Barrier(num_barriers=COMPUTE_WGS)]
    out_type = (jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((b, h, lp), jnp.float32))
    grid = (h, lp // (COMPUTE_WGS * bq), b)
    return _launch(kernel, out_type, scratch, grid, "q_seq", interpret)(q, k, v)


def _dq(q, k, v, do, lse2, delta, *, sm_scale: float, blocks: BlockSizes, interpret: Any):
    b, lp, h, d = q.shape
    bq, bkv, dtype = WGMMA_ROWS, blocks.block_kv_dq, q.dtype
    tr = _transforms(d, dtype)
    scale2 = sm_scale * LOG2E

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, q_smem, do_smem, ds_smem, row_smem, bars):
        bi, hi, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
        row0 = lax.axis_index("q_seq") * (COMPUTE_WGS * bq) + wg * bq
        q_s, do_s, ds_s = q_smem.at[wg], do_smem.at[wg], ds_smem.at[wg]

        def compute(pipeline):
            rows = pl.ds(row0, bq)
            sources = (q_ref.at[bi, rows, hi], do_ref.at[bi, rows, hi], lse_ref.at[bi, hi, rows],
                       delta_ref.at[bi, hi, rows])
            targets = (q_s, do_s, row_smem.at[wg, 0], row_smem.at[wg, 1])
            for i, (src, dst) in enumerate(zip(sources, targets)):
                plgpu.copy_gmem_to_smem(src, dst, bars.at[wg * 4 + i])
            for i in range(4):
                plgpu.barrier_wait(bars.at[wg * 4 + i])
            lse_rows = plgpu.load(row_smem.at[wg, 0], layout=_ROW)
            delta_rows = plgpu.load(row_smem.at[wg, 1], layout=_ROW)

            def accumulate(dq_acc):
                pipeline((dq_acc, lse_rows, delta_rows))
                return dq_acc[...]
            dq = pl.run_scoped(accumulate, plgpu.ACC((bq, d), jnp.float32))
            q_s[...] = (dq * sm_scale).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_s, dq_ref.at[bi, rows, hi])
            plgpu.wait_smem_to_gmem(0)

        def step(_, k_s, v_s, carry):
            dq_acc, lse_rows, delta_rows = carry
            s = _matmul(q_s, k_s.transpose((1, 0)), (bq, bkv)) * scale2
            p = jnp.exp2(s - _bcast_rows(lse_rows, s.shape))
            dp = _matmul(do_s, v_s.transpose((1, 0)), (bq, bkv))
            ds_s[...] = (p * (dp - _bcast_rows(delta_rows, dp.shape))).astype(dtype)
            plgpu.commit_smem()
            plgpu.wgmma(dq_acc, ds_s, k_s)
            plgpu.wgmma_wait(0)  # k_s goes back to the producer when this step returns
            return carry

        kv_spec = plgpu.BlockSpec((bkv, d), lambda i: (i, 0), transforms=tr)
        _pipeline(step, compute, lp // bkv, blocks, [kv_spec] * 2)(k_ref.at[bi, :, hi, :], v_ref.at[bi, :, hi, :])

    scratch = [plgpu.SMEM((COMPUTE_WGS, bq, d), dtype, transforms=tr),
               plgpu.SMEM((COMPUTE_WGS, bq, d), dtype, transforms=tr),
               plgpu.SMEM((COMPUTE_WGS, bq, bkv), dtype, transforms=tr),
               plgpu.SMEM((COMPUTE_WGS, 2, bq), jnp.float32),
               plgpu.Barrier(num_barriers=COMPUTE_WGS * 4)]
    grid = (h, lp // (COMPUTE_WGS * bq), b)
    return _launch(kernel, jax.ShapeDtypeStruct(q.shape, dtype), scratch, grid, "q_seq", interpret)(
        q, k, v, do, lse2, delta)


def _dkv(q, k, v, do, lse2, delta, *, sm_scale: float, blocks: BlockSizes, interpret: Any):
    """Works on transposed logits S^T [kv, q]: the per-query LSE/delta become column vectors."""
    b, lp, h, d = q.shape
    bkv, bq, dtype = WGMMA_ROWS, blocks.block_q_dkv, q.dtype
    tr = _transforms(d, dtype)
    scale2 = sm_scale * LOG2E

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, k_smem, v_smem, p_smem, bars):
        bi, hi, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
        rows = pl.ds(lax.axis_index("kv_seq") * (COMPUTE_WGS * bkv) + wg * bkv, bkv)
        k_s, v_s, p_s = k_smem.at[wg], v_smem.at[wg], p_smem.at[wg]

        def compute(pipeline):
            plgpu.copy_gmem_to_smem(k_ref.at[bi, rows, hi], k_s, bars.at[2 * wg])
            plgpu.copy_gmem_to_smem(v_ref.at[bi, rows, hi], v_s, bars.at[2 * wg + 1])
            plgpu.barrier_wait(bars.at[2 * wg])
            plgpu.barrier_wait(bars.at[2 * wg + 1])

            def accumulate(dk_acc, dv_acc):
                pipeline((dk_acc, dv_acc))
                return dk_acc[...], dv_acc[...]
            dk, dv = pl.run_scoped(accumulate, plgpu.ACC((bkv, d), jnp.float32), plgpu.ACC((bkv, d), jnp.float32))
            k_s[...] = (dk * sm_scale).astype(dtype)
            v_s[...] = dv.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_s, dk_ref.at[bi, rows, hi])
            plgpu.copy_smem_to_gmem(v_s, dv_ref.at[bi, rows, hi])
            plgpu.wait_smem_to_gmem(0)

        def step(_, q_s, do_s, lse_s, delta_s, carry):
            dk_acc, dv_acc = carry
            s_t = _matmul(k_s, q_s.transpose((1, 0)), (bkv, bq)) * scale2
            p_t = jnp.exp2(s_t - _bcast_cols(plgpu.load(lse_s, layout=_COL), s_t.shape))
            p_s[...] = p_t.astype(dtype)
            plgpu.commit_smem()
            plgpu.wgmma(dv_acc, p_s, do_s)
            # Reading dP^T waits for every wgmma in flight, so the dV one is done with p_s after this.
            dp_t = _matmul(v_s, do_s.transpose((1, 0)), (bkv, bq))
            ds_t = p_t * (dp_t - _bcast_cols(plgpu.load(delta_s, layout=_COL), dp_t.shape))
            p_s[...] = ds_t.astype(dtype)
            plgpu.commit_smem()
            plgpu.wgmma(dk_acc, p_s, q_s)
            plgpu.wgmma_wait(0)  # q_s/do_s go back to the producer when this step returns
            return carry

        specs = [plgpu.BlockSpec((bq, d), lambda i: (i, 0), transforms=tr)] * 2 + [
            plgpu.BlockSpec((bq,), lambda i: (i,))] * 2
        _pipeline(step, compute, lp // bq, blocks, specs)(
            q_ref.at[bi, :, hi, :], do_ref.at[bi, :, hi, :], lse_ref.at[bi, hi, :], delta_ref.at[bi, hi, :])

    scratch = [plgpu.SMEM((COMPUTE_WGS, bkv, d), dtype, transforms=tr),
               plgpu.SMEM((COMPUTE_WGS, bkv, d), dtype, transforms=tr),
               plgpu.SMEM((COMPUTE_WGS, bkv, bq), dtype, transforms=tr),
               plgpu.Barrier(num_barriers=2 * COMPUTE_WGS)]
    out = jax.ShapeDtypeStruct(q.shape, dtype)
    grid = (h, lp // (COMPUTE_WGS * bkv), b)
    return _launch(kernel, (out, out), scratch, grid, "kv_seq", interpret)(q, k, v, do, lse2, delta)


def forward(q: jax.Array, k: jax.Array, v: jax.Array, *, sm_scale: float, blocks: BlockSizes,
            interpret: Any) -> tuple[jax.Array, jax.Array]:
    """[B, L, H, Dp] inputs -> (out [B, L, H, Dp], lse [B, H, L] float32, natural log)."""
    _check_blocks(blocks, q.shape[3], q.dtype.itemsize)
    length = q.shape[1]
    lp = round_up(length, _seq_multiple(blocks))
    out, lse = _fwd(*(pad_axis(x, 1, lp) for x in (q, k, v)), sm_scale=sm_scale, seq_len=length,
                    blocks=blocks, interpret=interpret)
    return out[:, :length], lse[:, :, :length]


def backward(q: jax.Array, k: jax.Array, v: jax.Array, lse: jax.Array, delta: jax.Array, do: jax.Array, *,
             sm_scale: float, blocks: BlockSizes, interpret: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """dQ, dK, dV for [B, L, H, Dp] inputs given the forward LSE and delta=rowsum(o*do), [B, H, L]."""
    _check_blocks(blocks, q.shape[3], q.dtype.itemsize)
    length = q.shape[1]
    lp = round_up(length, _seq_multiple(blocks))
    q, k, v, do = (pad_axis(x, 1, lp) for x in (q, k, v, do))
    lse2, delta = pad_axis(lse * LOG2E, 2, lp), pad_axis(delta, 2, lp)
    kw = dict(sm_scale=sm_scale, blocks=blocks, interpret=interpret)
    dq = _dq(q, k, v, do, lse2, delta, **kw)
    dk, dv = _dkv(q, k, v, do, lse2, delta, **kw)
    return dq[:, :length], dk[:, :length], dv[:, :length]
