"""Process-wide performance defaults for the CLIs: glibc malloc tuning and XLA:CPU flags.

Call :func:`configure` first thing in an entry point, before jax is imported (XLA reads ``XLA_FLAGS``
once, and malloc settings must precede the threads that would create their own arenas). Everything
here only changes speed and memory, never results beyond floating-point summation order.

Why (measured on a 2-core AVX-512/AVX512-BF16 host, docs/benchmarks.md):

* XLA:CPU allocates each step's scratch buffer (GBs for a DiT) with malloc and frees it afterwards.
  glibc serves blocks that large with mmap and returns them on free, so every step faults in and
  zeroes GBs of fresh pages: seconds of kernel time per step. Keeping the heap (no mmap, no trim,
  one arena so worker threads share it) reuses the pages, as tcmalloc does, without tcmalloc's
  larger peak. Opt out with ``DITJAX_NO_MALLOC_TUNING=1``.
* jax 0.12 sends CPU dots to YNNPACK, which has no fast bf16 path for every layout (weight
  gradients fall back to Eigen, which converts bf16 element by element). oneDNN's matmul uses
  AVX512-BF16 for all of them. The concurrency-optimised scheduler keeps more buffers live at once
  (+25% scratch) for little gain on few cores. Opt out with ``DITJAX_NO_XLA_DEFAULTS=1``; any flag
  already in ``XLA_FLAGS`` wins over these defaults.
"""
from __future__ import annotations

import ctypes
import os

XLA_CPU_DEFAULTS = {
    "xla_cpu_experimental_ynn_fusion_type": "",
    "xla_cpu_experimental_onednn_custom_call": "true",
    "xla_cpu_enable_concurrency_optimized_scheduler": "false",
}
# mallopt(3) parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def configure() -> None:
    """Apply both defaults unless opted out; safe to call more than once."""
    if not os.environ.get("DITJAX_NO_MALLOC_TUNING"):
        tune_glibc_malloc()
    if not os.environ.get("DITJAX_NO_XLA_DEFAULTS"):
        os.environ["XLA_FLAGS"] = with_xla_defaults(os.environ.get("XLA_FLAGS", ""))


def tune_glibc_malloc() -> bool:
    """Keep freed memory in one heap for reuse (glibc only; another preloaded allocator is left alone)."""
    if allocator() != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # A trim threshold of -1 reads as SIZE_MAX inside glibc: never hand the heap top back.
    return all(libc.mallopt(p, v) == 1 for p, v in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_ARENA_MAX, 1)))


def with_xla_defaults(flags: str) -> str:
    """``flags`` plus each default it does not set itself."""
    given = {f.lstrip("-").split("=")[0] for f in flags.split()}
    extra = [f"--{k}={v}" for k, v in XLA_CPU_DEFAULTS.items() if k not in given]
    return " ".join(extra + flags.split())


def allocator() -> str:
    """Which malloc this process runs on, read from its own memory map."""
    with open("/proc/self/maps") as f:
        maps = f.read()
    return next((name for name in ("tcmalloc", "jemalloc", "mimalloc") if name in maps), "glibc")


def describe() -> str:
    """One token each for the allocator and XLA flags, for benchmark lines."""
    tuned = allocator() == "glibc" and not os.environ.get("DITJAX_NO_MALLOC_TUNING")
    flags = os.environ.get("XLA_FLAGS", "").replace(" ", ",") or "-"
    return f"allocator={allocator()}{'+tuned' if tuned else ''} xla_flags={flags}"
