"""Process-wide performance defaults for the CLIs: glibc malloc tuning and XLA:CPU flags.

Call :func:`configure` first thing in an entry point, before jax is imported (XLA reads ``XLA_FLAGS``
once, and malloc settings must precede the threads that would create their own arenas). Everything
here only changes speed and memory, never results beyond floating-point summation order.

Why (measured on a 2-core Xeon with AVX-512, AVX512-BF16 and AMX, docs/benchmarks.md):

* XLA:CPU allocates each step's scratch buffers (GBs for a DiT) with malloc and frees them after.
  glibc serves blocks that large with mmap and returns them on free, so every step faults in and
  zeroes GBs of fresh pages: ~2 s of kernel time per DiT-S/2 step. ``DITJAX_MALLOC_TUNING=1`` keeps
  them in one heap instead (no mmap, no trim, one arena so worker threads share it) and reuses the
  pages, as tcmalloc does; it is opt-in because the heap fragments: peak RSS rose by ~3.5 GB.
* jax 0.12 sends CPU dots to YNNPACK, whose bf16 matmuls ran 3-7x slower than oneDNN's here, and
  which leaves the weight-gradient layout (lhs contracted on its major dim) to Eigen, slower still
  in bf16. With YNNPACK off and oneDNN custom calls on, every dot goes to oneDNN: a DiT-S/2 block's
  fwd+bwd took 6x less time in bf16 and 20% less in fp32. The concurrency-optimised scheduler keeps
  more buffers live at once (+25% scratch) for nothing measurable on few cores.
  Opt out with ``DITJAX_NO_XLA_DEFAULTS=1``; any flag already in ``XLA_FLAGS`` wins over these.
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
    """Apply the XLA defaults unless opted out, and the malloc tuning if opted in."""
    if os.environ.get("DITJAX_MALLOC_TUNING") == "1":
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
    tuned = allocator() == "glibc" and os.environ.get("DITJAX_MALLOC_TUNING") == "1"
    flags = os.environ.get("XLA_FLAGS", "").replace(" ", ",") or "-"
    return f"allocator={allocator()}{'+tuned' if tuned else ''} xla_flags={flags}"
