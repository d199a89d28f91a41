"""Process-wide performance defaults for the CLIs: XLA:CPU flags and glibc malloc reuse.

Every entry point calls :func:`configure` before its first JAX computation (XLA reads ``XLA_FLAGS``
when the backend starts; malloc settings belong before the worker threads that would make their own
arenas). Everything here only changes speed and memory, never results beyond summation order.

Why (measured on a 2-core Xeon with AVX-512, AVX512-BF16 and AMX, docs/benchmarks.md):

* jax 0.12 sends CPU dots to YNNPACK, whose bf16 matmuls ran 3-7x slower than oneDNN's here, and
  which leaves the weight-gradient layout (lhs contracted on its major dim) to Eigen, slower still
  in bf16. With YNNPACK off and oneDNN custom calls on, every dot goes to oneDNN: a DiT-S/2 block's
  fwd+bwd took 6x less time in bf16 and 20% less in fp32. The concurrency-optimised scheduler keeps
  more buffers live at once (+25% scratch) for nothing measurable on few cores.
  Opt out with ``DITJAX_NO_XLA_DEFAULTS=1``; any flag already in ``XLA_FLAGS`` wins over these.
* XLA:CPU allocates each step's scratch buffers with malloc and frees them after. glibc serves
  blocks that large with mmap and returns them on free, so every step faults in and zeroes fresh
  pages (a quarter of the default config's step, ~2 s of kernel time per DiT-S/2 step). Malloc reuse
  keeps them in one heap instead (no mmap, no trim, one arena) and reuses the pages, as tcmalloc
  does. The heap can fragment: peak RSS was unchanged for the default config but rose by ~3.5 GB
  for DiT-S/2. ``DITJAX_MALLOC_TUNING=1`` forces it on, ``=0`` off; by default it is on where JAX can
  only run on the CPU (no accelerator plugin installed, or ``JAX_PLATFORMS=cpu``), since on a GPU or
  TPU host the step's scratch lives on the device and the host's threads are better off with arenas.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import logging
import os

XLA_CPU_DEFAULTS = {
    "xla_cpu_experimental_ynn_fusion_type": "",
    "xla_cpu_experimental_onednn_custom_call": "true",
    "xla_cpu_enable_concurrency_optimized_scheduler": "false",
}
# mallopt(3) parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_malloc_tuned = False


def configure() -> None:
    """Apply the XLA defaults unless opted out, and malloc reuse where it is on (see the module doc)."""
    global _malloc_tuned
    if malloc_tuning_wanted():
        _malloc_tuned = tune_glibc_malloc()
    if not os.environ.get("DITJAX_NO_XLA_DEFAULTS"):
        os.environ["XLA_FLAGS"] = with_xla_defaults(os.environ.get("XLA_FLAGS", ""))


def start_cli() -> None:
    """What every entry point does first: these defaults, then ditjax's console logging, and one line
    saying what was applied (performance numbers are only comparable with it)."""
    configure()
    from ditjax.logs import setup_logging

    setup_logging()
    logging.getLogger("ditjax.runtime").info("runtime: %s", describe())


def malloc_tuning_wanted() -> bool:
    """``DITJAX_MALLOC_TUNING`` if set (1/0), else whether JAX can only run on the CPU."""
    setting = os.environ.get("DITJAX_MALLOC_TUNING", "").strip()
    if setting in ("0", "1"):
        return setting == "1"
    if setting:
        raise ValueError(f"DITJAX_MALLOC_TUNING={setting!r}: use 1 (on), 0 (off) or leave it unset (auto)")
    return cpu_only()


def cpu_only() -> bool:
    """Whether JAX will run on the CPU alone, decided without starting a backend."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms == "cpu"
    # jax finds accelerator plugins (jax-cuda*-plugin, ROCm) by entry point or in the jax_plugins namespace.
    plugins = importlib.metadata.entry_points(group="jax_plugins")
    return not plugins and all(importlib.util.find_spec(m) is None for m in ("jax_plugins", "libtpu"))


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
    """One token each for the allocator and XLA flags, for benchmark and log lines."""
    flags = os.environ.get("XLA_FLAGS", "").replace(" ", ",") or "-"
    return f"allocator={allocator()}{'+reuse' if _malloc_tuned else ''} xla_flags={flags}"
