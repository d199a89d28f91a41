"""Throughput accounting (model FLOPs, MFU) and metric writers (console, JSONL, TensorBoard)."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from ditjax.models import DiTConfig

log = logging.getLogger(__name__)

# Dense peak FLOP/s per chip (bf16 unless noted), from the vendors' data sheets.
CHIP_PEAK_FLOPS = {
    "v5e": 197e12,   # cloud.google.com/tpu/docs/v5e
    "v5p": 459e12,   # cloud.google.com/tpu/docs/v5p
    "v6e": 918e12,   # cloud.google.com/tpu/docs/v6e (Trillium)
    "h100": 989e12,  # NVIDIA H100 SXM data sheet, dense BF16
    "h200": 989e12,  # NVIDIA H200 data sheet (same compute as H100)
}


def forward_macs_per_image(cfg: DiTConfig) -> float:
    """Multiply-accumulates of one forward pass (DiT's GFLOPs convention: 119 for DiT-XL/2 at 256px)."""
    t, d, p = cfg.num_tokens, cfg.hidden_size, cfg.patch_size
    per_block = t * (4 * d * d + 2 * d * cfg.mlp_hidden) + 2 * t * t * d + 6 * d * d
    embed = t * p * p * cfg.in_channels * d + 256 * d + d * d
    final = t * d * p * p * cfg.out_channels + 2 * d * d
    return cfg.depth * per_block + embed + final


def train_flops_per_image(cfg: DiTConfig) -> float:
    """FLOPs of forward + backward: 2 FLOPs per MAC, backward ≈ 2× forward."""
    return 3 * 2 * forward_macs_per_image(cfg)


def _chip_key(device: jax.Device) -> str | None:
    kind = device.device_kind.lower()
    for key in CHIP_PEAK_FLOPS:
        if key in kind.replace(" ", ""):
            return key
    if "v5 lite" in kind or "v5litepod" in kind:
        return "v5e"
    return None


def measured_matmul_peak(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` FLOP/s of a jitted n×n matmul: this host's practical peak, measured per run
    (never cached: a number taken while the machine was busy would stick)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops_per_device(dtype: str = "float32") -> tuple[float, str]:
    """(peak FLOP/s, where it came from) for the first local device."""
    device = jax.local_devices()[0]
    chip = _chip_key(device)
    if chip is not None:
        return CHIP_PEAK_FLOPS[chip], f"{chip} data sheet"
    return measured_matmul_peak(dtype), f"measured {dtype} matmul on {device.platform}"


class MetricWriter:
    """Process 0 writes a JSONL file and TensorBoard events (tensorboardX: no TensorFlow needed)."""

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True):
        self.enabled = enabled and jax.process_index() == 0
        if not self.enabled:
            return
        Path(workdir).mkdir(parents=True, exist_ok=True)
        self._jsonl = open(Path(workdir) / "metrics.jsonl", "a", buffering=1)
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        for name, value in scalars.items():
            self._tb.add_scalar(name, value, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
