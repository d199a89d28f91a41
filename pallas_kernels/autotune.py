"""Pick flash-attention block sizes by timing candidates on the real device; cache them as JSON.

The best blocks depend on the chip, the shape and the dtype, and tuning costs one compile per
candidate, so results are cached in ~/.cache/ditjax/flash_attention_blocks.json keyed by
(chip, backend, shape, dtype). `lookup` (used at trace time by flash_attention) only reads the
cache; `tune` must be called eagerly, e.g. once before training. In interpret mode (CPU) timing
says nothing about a TPU or GPU, so `tune` returns the defaults without timing.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp

from pallas_kernels.common import BlockSizes, resolve_backend, round_up

CACHE_PATH = os.path.join(os.path.expanduser("~"), ".cache", "ditjax", "flash_attention_blocks.json")


def _key(backend: str, shape: tuple[int, ...], dtype) -> str:
    chip = jax.devices()[0].device_kind
    return f"{chip}|{backend}|{'x'.join(map(str, shape))}|{jnp.dtype(dtype).name}"


def _load(path: str) -> dict[str, dict[str, int]]:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _store(path: str, key: str, blocks: BlockSizes) -> None:
    """Read-modify-write with an atomic rename, so concurrent processes never see half a file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    table = _load(path)
    table[key] = blocks.to_dict()
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def lookup(backend: str, shape: tuple[int, ...], dtype, path: str = CACHE_PATH) -> BlockSizes:
    """Cached best blocks for this chip/shape/dtype, else the backend defaults."""
    hit = _load(path).get(_key(backend, tuple(shape), dtype))
    return BlockSizes(**hit) if hit else BlockSizes.default(backend, shape[1])


def _candidates(backend: str, seq_len: int) -> tuple[list[BlockSizes], Callable[[BlockSizes], Iterable[BlockSizes]]]:
    """Forward candidates, and for a chosen forward the backward candidates to try with it."""
    if backend == "gpu":
        fwd = [BlockSizes(64, kv, 64, 64, 64, 64, stages) for kv, stages in itertools.product((64, 128), (2, 3, 4))]
        return fwd, lambda best: [dataclasses.replace(best, block_kv_dq=a, block_q_dkv=b)
                                  for a, b in itertools.product((64, 128), (64, 128))]
    tiles = sorted({min(t, round_up(seq_len, 128)) for t in (128, 256, 512, 1024)})
    fwd = [BlockSizes(a, b, a, b, a, b) for a, b in itertools.product(tiles, tiles)]
    return fwd, lambda best: [dataclasses.replace(best, block_q_dq=a, block_kv_dq=b, block_q_dkv=a, block_kv_dkv=b)
                              for a, b in itertools.product(tiles, tiles)]


def _time(fn: Callable[[], jax.Array], iters: int) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    start = time.perf_counter()
    for _ in range(iters):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / iters


def tune(shape: tuple[int, int, int, int], dtype, backend: str | None = None, *, iters: int = 10,
         path: str = CACHE_PATH) -> BlockSizes:
    """Time candidate blocks for [B, L, H, D] inputs on the current device; cache and return the best."""
    from pallas_kernels.flash import flash_attention  # avoid an import cycle with flash -> autotune

    backend = resolve_backend(backend)
    if jax.default_backend() == "cpu":
        return BlockSizes.default(backend, shape[1])
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, ct = (jax.random.normal(kk, shape, dtype) for kk in keys)

    def run(blocks: BlockSizes, with_grad: bool) -> float:
        def f(q, k, v):
            return flash_attention(q, k, v, block_sizes=blocks, backend=backend)

        fn = jax.jit(lambda q, k, v: jax.vjp(f, q, k, v)[1](ct) if with_grad else f(q, k, v))
        try:
            return _time(lambda: fn(q, k, v), iters)
        except Exception:  # a candidate that does not compile (e.g. out of VMEM/SMEM) just loses
            return float("inf")

    fwd_candidates, bwd_candidates = _candidates(backend, shape[1])
    best = min(fwd_candidates, key=lambda blocks: run(blocks, False))
    best = min(bwd_candidates(best), key=lambda blocks: run(blocks, True))
    _store(path, _key(backend, tuple(shape), dtype), best)
    return best
