"""Process-level performance settings (allocator, XLA flags) applied before jax is imported."""
from __future__ import annotations

import os


def configure() -> None:
    """Placeholder while measuring."""


def allocator() -> str:
    """Which malloc this process runs on, read from its own memory map."""
    with open("/proc/self/maps") as f:
        maps = f.read()
    for name in ("tcmalloc", "jemalloc", "mimalloc"):
        if name in maps:
            return name
    return "glibc"


def describe() -> str:
    return f"allocator={allocator()} xla_flags={os.environ.get('XLA_FLAGS', '').replace(' ', ',') or '-'}"
