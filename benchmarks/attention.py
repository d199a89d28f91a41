"""Attention throughput on one GPU: our Mosaic GPU flash kernel vs XLA, cuDNN and jax's bundled Pallas kernels.

Prints, for L in {256, 1024, 4096} and D in {64, 72, 128}, forward and forward+backward time,
TFLOP/s and % of the bf16 dense peak (989 TFLOP/s on H100/H200). FLOPs follow the FlashAttention
convention with the true head dim: forward 4*B*H*L^2*D, backward 2.5x forward. Shapes keep
B*L = 16k tokens and H*D = 2048 (the FA2/FA3 benchmark set) unless overridden.

  python benchmarks/attention.py                 # full sweep, needs a GPU
  python benchmarks/attention.py --autotune      # tune our block sizes per shape first (cached)
  python benchmarks/attention.py --smoke         # CPU: tiny interpret-mode correctness check only

jax's Pallas-Triton `mha` is deprecated (and Triton lowering of pallas_call too) but still ships in
jax 0.12. jax's `attention_mgpu` needs D % 64 == 0 (D=72 is zero-padded to 128 for it), does not
apply the softmax scale itself (q is pre-scaled), and in jax 0.12 stages through float16 shared
memory, so it is run on float16 inputs.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from pallas_kernels import autotune, reference

PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16
SEQ_LENS = (256, 1024, 4096)
HEAD_DIMS = (64, 72, 128)

Impl = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _ours(q, k, v):
    return pallas_kernels.flash_attention(q, k, v, backend="gpu")


def _xla(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")


def _cudnn(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")


def _jax_triton(q, k, v):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import attention
    blocks = attention.BlockSizes(block_q=128, block_k=64, block_q_dkv=64, block_kv_dkv=64,
                                  block_q_dq=64, block_kv_dq=64)
    return attention.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5, block_sizes=blocks)


def _jax_mgpu(q, k, v):
    from jax.experimental.pallas.ops.gpu import attention_mgpu
    d = q.shape[-1]
    config = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, block_q_dkv=64,
                                         block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)
    widths = ((0, 0), (0, 0), (0, 0), (0, (-d) % 64))
    q16, k16, v16 = (jnp.pad(x.astype(jnp.float16), widths) for x in (q * d ** -0.5, k, v))
    return attention_mgpu.attention(q16, k16, v16, config)[..., :d].astype(q.dtype)


IMPLS: dict[str, Impl] = {"ours": _ours, "xla": _xla, "cudnn": _cudnn, "jax-pallas-triton": _jax_triton,
                          "jax-mgpu": _jax_mgpu}


def _time_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn())
    start = time.perf_counter()
    for _ in range(iters):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / iters * 1e3


def _bench_one(impl: Impl, q, k, v, ct, warmup: int, iters: int) -> tuple[float, float, float]:
    """(forward ms, forward+backward ms, max |out - xla out|)."""
    fwd = jax.jit(impl)
    fwd_bwd = jax.jit(lambda q, k, v: jax.vjp(impl, q, k, v)[1](ct))
    err = float(jnp.max(jnp.abs(fwd(q, k, v).astype(jnp.float32) - _xla(q, k, v).astype(jnp.float32))))
    return _time_ms(lambda: fwd(q, k, v), warmup, iters), _time_ms(lambda: fwd_bwd(q, k, v), warmup, iters), err


def run_gpu(args: argparse.Namespace) -> list[dict]:
    rows = []
    device = jax.devices()[0]
    print(f"device: {device.device_kind}; peak {PEAK_TFLOPS} TFLOP/s bf16 dense")
    print(f"{'L':>5} {'D':>4} {'B':>3} {'H':>3} {'impl':<18} {'fwd ms':>8} {'TF/s':>7} {'%pk':>5} "
          f"{'f+b ms':>8} {'TF/s':>7} {'%pk':>5} {'max err':>8}")
    for length in args.seq_lens:
        for d in args.head_dims:
            b, h = max(1, args.tokens // length), max(1, args.hidden // d)
            keys = jax.random.split(jax.random.key(0), 4)
            q, k, v, ct = (jax.random.normal(kk, (b, length, h, d), jnp.bfloat16) for kk in keys)
            ok, reason = pallas_kernels.supports(q.shape, q.dtype, "gpu")
            if args.autotune and ok:
                autotune.tune(q.shape, q.dtype, "gpu")
            fwd_flops = 4 * b * h * length * length * d
            for name in args.impls:
                if name == "ours" and not ok:
                    print(f"{length:>5} {d:>4} {b:>3} {h:>3} {name:<18} skipped: {reason}")
                    continue
                try:
                    fwd_ms, total_ms, err = _bench_one(IMPLS[name], q, k, v, ct, args.warmup, args.iters)
                except Exception as e:  # one implementation failing a shape must not end the sweep
                    print(f"{length:>5} {d:>4} {b:>3} {h:>3} {name:<18} failed: {type(e).__name__}: {str(e)[:90]}")
                    continue
                fwd_tf = fwd_flops / fwd_ms / 1e9
                total_tf = 3.5 * fwd_flops / total_ms / 1e9
                print(f"{length:>5} {d:>4} {b:>3} {h:>3} {name:<18} {fwd_ms:8.3f} {fwd_tf:7.1f} "
                      f"{100 * fwd_tf / PEAK_TFLOPS:5.1f} {total_ms:8.3f} {total_tf:7.1f} "
                      f"{100 * total_tf / PEAK_TFLOPS:5.1f} {err:8.2e}")
                rows.append(dict(L=length, D=d, B=b, H=h, impl=name, fwd_ms=fwd_ms, fwd_tflops=fwd_tf,
                                 fwd_bwd_ms=total_ms, fwd_bwd_tflops=total_tf, max_err_vs_xla=err))
    return rows


def run_smoke() -> bool:
    """Tiny interpret-mode check of both kernels against the float64 reference (CPU, ~1 minute)."""
    shape = (1, 130, 2, 72)
    ok = True
    for backend, dtype, tol in (("tpu", jnp.float32, 1e-5), ("gpu", jnp.bfloat16, 2e-2)):
        keys = jax.random.split(jax.random.key(0), 4)
        q, k, v, do = (jax.random.normal(kk, shape, jnp.float32).astype(dtype) for kk in keys)
        fn = functools.partial(pallas_kernels.flash_attention, backend=backend, interpret=True)
        out, vjp = jax.vjp(fn, q, k, v)
        got = (out, *vjp(do))
        lse_ct = np.zeros((shape[0], shape[2], shape[1]))
        want = (reference.attention(q, k, v, shape[3] ** -0.5)[0],
                *reference.attention_vjp(q, k, v, do, lse_ct, shape[3] ** -0.5))
        errs = [float(np.abs(np.asarray(g, np.float64) - w).max() / np.abs(w).max()) for g, w in zip(got, want)]
        passed = max(errs) <= tol
        ok &= passed
        print(f"smoke {backend} {jnp.dtype(dtype).name} {shape}: rel err out/dq/dk/dv "
              f"{' '.join(f'{e:.1e}' for e in errs)} (tol {tol}) {'ok' if passed else 'FAIL'}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU-only interpret-mode correctness check")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=SEQ_LENS)
    parser.add_argument("--head-dims", type=int, nargs="+", default=HEAD_DIMS)
    parser.add_argument("--tokens", type=int, default=16384, help="B*L per shape")
    parser.add_argument("--hidden", type=int, default=2048, help="H*D per shape")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--autotune", action="store_true", help="tune (and cache) our block sizes per shape first")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.smoke:
        sys.exit(0 if run_smoke() else 1)
    if jax.default_backend() != "gpu":
        sys.exit(f"no GPU found (jax backend: {jax.default_backend()}); this benchmark needs one. "
                 "Use --smoke for the CPU correctness check.")
    rows = run_gpu(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
