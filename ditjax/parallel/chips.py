"""Accelerator constants for memory planning and roofline estimates.

| chip | peak bf16 dense | HBM | HBM bandwidth | interconnect (per chip, one direction) | source |
|---|---|---|---|---|---|
| v5e | 197 TFLOP/s | 16 GiB | 819 GB/s | ICI 200 GB/s (400 GB/s bidirectional) | cloud.google.com/tpu/docs/v5e |
| v5p | 459 TFLOP/s | 95 GB | 2765 GB/s | ICI 600 GB/s (4800 Gbps) | cloud.google.com/tpu/docs/v5p |
| v6e | 918 TFLOP/s | 32 GB | 1638 GB/s | ICI 400 GB/s (800 GB/s bidirectional) | cloud.google.com/tpu/docs/v6e |
| h100 | 989 TFLOP/s | 80 GB | 3.35 TB/s | NVLink 450 GB/s in a node of 8; IB 50 GB/s across | H100 SXM data sheet |
| h200 | 989 TFLOP/s | 141 GB | 4.8 TB/s | NVLink 450 GB/s in a node of 8; IB 50 GB/s across | H200 SXM data sheet |

NVLink 4 is 900 GB/s bidirectional per GPU; across nodes each GPU has one 400 Gb/s InfiniBand NIC.

The v5e data sheet says "16 GB"; the chip has 16 GiB, of which the runtime reserves a little (JAX reports
about 15.75 GiB usable). Peak FLOP/s come from :data:`ditjax.train.metrics.CHIP_PEAK_FLOPS`, the table the
trainer's MFU uses, so planned and measured MFU share one denominator.
"""
from __future__ import annotations

import dataclasses

from ditjax.train.metrics import CHIP_PEAK_FLOPS

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float       # dense bf16 FLOP/s
    hbm_bytes: float
    hbm_bandwidth: float    # bytes/s
    link_bandwidth: float   # bytes/s one direction per chip on the fast interconnect (ICI / NVLink)
    island: int             # chips sharing that interconnect (TPU pod, GPU node)
    scale_out_bandwidth: float | None  # bytes/s per chip beyond the island (None: not modelled)


CHIPS: dict[str, Chip] = {
    "v5e": Chip("v5e", CHIP_PEAK_FLOPS["v5e"], 16 * GiB, 819e9, 200e9, 256, None),
    "v5p": Chip("v5p", CHIP_PEAK_FLOPS["v5p"], 95e9, 2765e9, 600e9, 8960, None),
    "v6e": Chip("v6e", CHIP_PEAK_FLOPS["v6e"], 32e9, 1638e9, 400e9, 256, None),
    "h100": Chip("h100", CHIP_PEAK_FLOPS["h100"], 80e9, 3.35e12, 450e9, 8, 50e9),
    "h200": Chip("h200", CHIP_PEAK_FLOPS["h200"], 141e9, 4.8e12, 450e9, 8, 50e9),
}


def get_chip(name: str) -> Chip:
    if name not in CHIPS:
        raise ValueError(f"unknown chip {name!r}; known: {', '.join(CHIPS)}")
    return CHIPS[name]
