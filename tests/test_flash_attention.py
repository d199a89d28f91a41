"""Flash attention (TPU and GPU kernels) and HASTE helpers against the float64 reference, on CPU.

Both kernels run in interpret mode: the TPU kernel in Pallas' HLO interpreter (which fills
uninitialised outputs and out-of-bounds block reads with NaN, so a NaN-free result proves every
element was written and no padding leaked in), the GPU kernel in the Mosaic GPU interpreter with
its race detector on (it simulates SMEM, barriers, TMA and wgmma, and also starts from NaN
buffers). Both are additionally lowered for their real platform ('tpu' / 'cuda') without a device.

Tolerances, measured as max|err| / max|ref| against float64 on the same (rounded) inputs:
fp32 1e-5, bf16 2e-2 for out, dq, dk, dv; LSE 1e-5 for both dtypes (it accumulates in fp32).
"""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import tpu as pltpu

import pallas_kernels as pk
from pallas_kernels import autotune, reference

TOL = {"float32": 1e-5, "bfloat16": 2e-2}
LSE_TOL = 1e-5
TPU_SMALL = pk.BlockSizes(128, 128, 128, 128, 128, 128)  # several blocks per axis at L=257
GPU_SMALL = pk.BlockSizes(64, 64, 64, 64, 64, 64, 2)
GPU_INTERPRET = plgpu.InterpretGPUParams(detect_races=True)

# (backend, [B, L, H, D], dtype, blocks, interpret): ragged L, B*H > 1, and every DiT head dim.
CASES = [
    ("tpu", (2, 257, 2, 72), "float32", TPU_SMALL, True),
    ("tpu", (2, 257, 2, 72), "bfloat16", TPU_SMALL, True),
    ("tpu", (1, 40, 2, 64), "float32", None, True),
    ("tpu", (1, 40, 2, 88), "float32", None, True),
    ("tpu", (1, 40, 2, 128), "bfloat16", None, True),
    ("gpu", (1, 130, 2, 72), "bfloat16", GPU_SMALL, GPU_INTERPRET),
]
IDS = [f"{c[0]}-{'x'.join(map(str, c[1]))}-{c[2]}" for c in CASES]


def _inputs(shape, dtype: str, seed: int = 0) -> list[jax.Array]:
    """q, k, v, dout [B, L, H, D] and an LSE cotangent [B, H, L] (exercised, as HASTE needs it)."""
    keys = jax.random.split(jax.random.key(seed), 5)
    b, length, h, _ = shape
    return ([jax.random.normal(k, shape, jnp.float32).astype(dtype) for k in keys[:4]]
            + [jax.random.normal(keys[4], (b, h, length), jnp.float32)])


@functools.cache
def _kernel_fn(backend: str, blocks, interpret):
    """jit(q, k, v, do, dlse -> out, lse, dq, dk, dv), compiled once per case and reused."""
    def run(q, k, v, do, dlse):
        (out, lse), vjp = jax.vjp(functools.partial(pk.flash_attention_with_lse, backend=backend,
                                                    block_sizes=blocks, interpret=interpret), q, k, v)
        return (out, lse, *vjp((do, dlse)))
    return jax.jit(run)


@functools.cache
def _results(case_index: int) -> tuple[np.ndarray, ...]:
    backend, shape, dtype, blocks, interpret = CASES[case_index]
    return tuple(np.asarray(x, np.float64) for x in _kernel_fn(backend, blocks, interpret)(*_inputs(shape, dtype)))


def _rel(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(x - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("case_index", range(len(CASES)), ids=IDS)
def test_matches_float64_reference(case_index):
    _, shape, dtype, _, _ = CASES[case_index]
    out, lse, dq, dk, dv = _results(case_index)
    for name, x in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv)):
        assert not np.isnan(x).any(), f"{name} has unwritten (NaN) elements"
    q, k, v, do, dlse = _inputs(shape, dtype)
    scale = shape[3] ** -0.5
    ref_out, ref_lse = reference.attention(q, k, v, scale)
    assert lse.shape == ref_lse.shape and out.shape == ref_out.shape
    assert _rel(lse, ref_lse) <= LSE_TOL
    assert _rel(out, ref_out) <= TOL[dtype]
    for name, x, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), reference.attention_vjp(q, k, v, do, dlse, scale)):
        assert _rel(x, ref) <= TOL[dtype], name


@pytest.mark.parametrize("case_index", [0, 1], ids=IDS[:2])
def test_deterministic(case_index):
    """Fixed reduction order, no atomics: reruns are bitwise equal. (The GPU interpreter runs
    sequentially, so a GPU rerun on CPU would prove nothing about the device.)"""
    backend, shape, dtype, blocks, interpret = CASES[case_index]
    again = _kernel_fn(backend, blocks, interpret)(*_inputs(shape, dtype))
    for first, second in zip(_results(case_index), again):
        np.testing.assert_array_equal(first, np.asarray(second, np.float64))


def test_interpret_modes_expose_unwritten_blocks():
    """The premise of the NaN checks above: a block a kernel never writes stays NaN, in both interpreters."""
    x = jnp.ones((128, 128), jnp.float32)

    def tpu_style(x_ref, o_ref):
        @pl.when(pl.program_id(0) == 0)
        def _():
            o_ref[...] = x_ref[...]

    spec = pl.BlockSpec((64, 128), lambda i: (i, 0))
    tpu_out = pl.pallas_call(tpu_style, grid=(2,), in_specs=[spec], out_specs=spec, out_shape=x, interpret=True)(x)

    def gpu_style(x_ref, o_ref, smem, barrier):
        @pl.when(jax.lax.axis_index("i") == 0)
        def _():
            plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(0, 64)], smem, barrier.at[0])
            plgpu.barrier_wait(barrier.at[0])
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(smem, o_ref.at[pl.ds(0, 64)])
            plgpu.wait_smem_to_gmem(0)

    gpu_out = plgpu.kernel(gpu_style, out_type=x, grid=(2,), grid_names=("i",),
                           scratch_types=[plgpu.SMEM((64, 128), jnp.float32), plgpu.Barrier(num_barriers=1)],
                           interpret=plgpu.InterpretGPUParams())(x)
    for out in (np.asarray(tpu_out), np.asarray(gpu_out)):
        assert np.isnan(out[64:]).all() and not np.isnan(out[:64]).any()


def test_tpu_kernel_under_tpu_simulator():
    """The Mosaic TPU simulator models DMAs, VMEM and the pipeline, and checks for races."""
    q, k, v = _inputs((1, 200, 1, 64), "float32")[:3]
    params = pltpu.InterpretParams(detect_races=True, out_of_bounds_reads="uninitialized")
    out = pk.flash_attention(q, k, v, backend="tpu", block_sizes=TPU_SMALL, interpret=params)
    assert _rel(np.asarray(out, np.float64), reference.attention(q, k, v, 64 ** -0.5)[0]) <= TOL["float32"]


@pytest.mark.parametrize("backend,platform,head_dims,dtype", [
    ("tpu", "tpu", (64, 72, 88, 128), jnp.float32),
    ("tpu", "tpu", (64, 72, 88, 128), jnp.bfloat16),
    ("gpu", "cuda", (72, 88, 128), jnp.bfloat16),  # swizzles of 32, 64 and 128 bytes
])
def test_lowers_for_real_platform(backend, platform, head_dims, dtype):
    """Lowering runs the Mosaic front ends (block/tiling rules, wgmma layouts and swizzles) on CPU."""
    for head_dim in head_dims:
        x = jax.ShapeDtypeStruct((2, 257, 2, head_dim), dtype)

        def fwd_bwd(q, k, v):
            out, vjp = jax.vjp(functools.partial(pk.flash_attention, backend=backend, interpret=False), q, k, v)
            return out, vjp(out)

        text = jax.jit(fwd_bwd).trace(x, x, x).lower(lowering_platforms=(platform,)).as_text()
        assert "custom_call" in text


@pytest.mark.parametrize("backend,shape,dtype,message", [
    ("tpu", (1, 64, 2, 300), jnp.float32, "head dim"),
    ("gpu", (1, 64, 2, 200), jnp.bfloat16, "head dim"),
    ("tpu", (1, 64, 2, 64), jnp.float16, "dtype float16"),
    ("gpu", (1, 64, 2, 64), jnp.float32, "dtype float32"),
])
def test_unsupported_inputs_raise(backend, shape, dtype, message):
    x = jnp.zeros(shape, dtype)
    with pytest.raises(ValueError, match=message):
        pk.flash_attention(x, x, x, backend=backend)


def test_mismatched_shapes_and_bad_blocks_raise():
    q, k = jnp.zeros((1, 64, 2, 64)), jnp.zeros((1, 32, 2, 64))
    with pytest.raises(ValueError, match="share one shape"):
        pk.flash_attention(q, k, k, backend="tpu")
    with pytest.raises(ValueError, match="multiples of 128"):
        pk.flash_attention(q, q, q, backend="tpu", block_sizes=pk.BlockSizes(block_q=96))
    qb = q.astype(jnp.bfloat16)
    with pytest.raises(ValueError, match="block_q must be 64"):
        pk.flash_attention(qb, qb, qb, backend="gpu", block_sizes=pk.BlockSizes(block_q=128))
    with pytest.raises(ValueError, match="backend"):
        pk.flash_attention(q, q, q, backend="cuda")


def test_supports_reports_reasons():
    assert pk.supports((8, 256, 16, 72), jnp.bfloat16, "tpu") == (True, "")
    ok, reason = pk.supports((8, 256, 16, 72), jnp.bfloat16, "cpu")
    assert not ok and "interpret" in reason
    ok, reason = pk.supports((8, 256, 16, 300), jnp.bfloat16, "tpu")
    assert not ok and "head dim" in reason
    ok, reason = pk.supports((8, 256, 16, 72), jnp.float32, "gpu")
    assert not ok and "float32" in reason
    ok, reason = pk.supports((8, 256, 16, 72), jnp.bfloat16, "gpu")  # this machine has no GPU
    assert not ok and "GPU" in reason


def test_attention_logits_and_log_probs_from_kernel_lse():
    shape = CASES[3][1]
    q, k, v = _inputs(shape, "float32")[:3]
    scale = shape[3] ** -0.5
    s_ref = np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64), np.asarray(k, np.float64)) * scale
    np.testing.assert_allclose(pk.attention_logits(q, k), s_ref, rtol=1e-5, atol=1e-5)
    lse = jnp.asarray(_results(3)[1], jnp.float32)  # the kernel's own LSE for these q, k, v
    log_p_ref = s_ref - reference.attention(q, k, v, scale)[1][..., None]
    np.testing.assert_allclose(pk.attention_log_probs(q, k, lse), log_p_ref, rtol=1e-5, atol=1e-5)


def _teacher(shape) -> jax.Array:
    b, length, h, _ = shape
    return jax.nn.softmax(jax.random.normal(jax.random.key(7), (b, h, length, length)), axis=-1)


def test_attention_ce_loss_matches_reference_and_autodiff():
    case = 3
    backend, shape, dtype, blocks, interpret = CASES[case]
    q, k, v = _inputs(shape, dtype)[:3]
    t = _teacher(shape)
    want = reference.attention_ce(q, k, t, shape[3] ** -0.5)

    def direct(q, k):
        return -jnp.mean(jnp.sum(t * jax.nn.log_softmax(pk.attention_logits(q, k), axis=-1), axis=-1))

    want_grads = jax.jit(jax.grad(direct, argnums=(0, 1)))(q, k)
    chunked = jax.jit(jax.value_and_grad(lambda q, k: pk.attention_ce_loss(q, k, t, max_rows=16), argnums=(0, 1)))
    loss, grads = chunked(q, k)  # 3 chunks of 16 rows, the last one padded
    assert abs(float(loss) - want) <= 1e-5 * abs(want)
    for got, w in zip(grads, want_grads):
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)

    # With the kernel's LSE: same loss; the gradient is the direct part plus the LSE cotangent
    # pushed back through the kernel's own VJP (the same compiled function as the main suite).
    lse = jnp.asarray(_results(case)[1], jnp.float32)
    loss, (gq, gk, glse) = jax.value_and_grad(lambda q, k, lse: pk.attention_ce_loss(q, k, t, lse=lse),
                                              argnums=(0, 1, 2))(q, k, lse)
    assert abs(float(loss) - want) <= 1e-5 * abs(want)
    _, _, dq, dk, dv = _kernel_fn(backend, blocks, interpret)(q, k, v, jnp.zeros_like(q), glse)
    np.testing.assert_allclose(gq + dq, want_grads[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gk + dk, want_grads[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dv, 0.0, atol=1e-6)  # the loss does not depend on v


def test_autotune_on_cpu_returns_defaults_and_lookup_reads_cache(tmp_path):
    path = str(tmp_path / "blocks.json")
    shape = (2, 256, 4, 72)
    assert autotune.tune(shape, jnp.bfloat16, "tpu", path=path) == pk.BlockSizes.default("tpu", 256)
    assert not (tmp_path / "blocks.json").exists()  # nothing was timed, nothing cached
    best = pk.BlockSizes(256, 128, 256, 128, 256, 128)
    autotune._store(path, autotune._key("tpu", shape, jnp.bfloat16), best)
    assert autotune.lookup("tpu", shape, jnp.bfloat16, path=path) == best
    assert autotune.lookup("tpu", (2, 512, 4, 72), jnp.bfloat16, path=path) == pk.BlockSizes.default("tpu", 512)
    assert len(json.load(open(path))) == 1
