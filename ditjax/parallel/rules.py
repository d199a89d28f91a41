"""Logical-axis rules: which mesh axes each logical name is split over.

A rule list maps names to mesh axes; the first match wins and a mesh axis is used once per array.
Presets cover the common strategies; a config may name one (``mesh.rules``), and users may write their
own list and register it here.

Logical names used by the models: ``batch``, ``tokens`` (activations); ``embed`` (width D), ``mlp``
(MLP hidden), ``heads``, ``head_dim``, ``adaln`` (6D / 2D modulation outputs), ``vocab`` (class table
rows), ``layers`` (the stacked axis of scanned blocks), ``expert`` (MoE experts).
"""
from __future__ import annotations

BATCH = ("batch", ("data", "fsdp", "expert"))

RULE_PRESETS: dict[str, list[tuple[str, str | tuple[str, ...] | None]]] = {
    # Replicated parameters, batch split over every device.
    "dp": [BATCH],
    # ZeRO-3 style: parameters, EMA and optimizer state split over `fsdp` along the width D.
    "fsdp": [BATCH, ("embed", "fsdp"), ("expert", "expert")],
    # FSDP plus Megatron tensor parallelism: heads, MLP hidden and modulation outputs over `tensor`.
    "fsdp_tp": [BATCH, ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("adaln", "tensor"),
                ("expert", "expert")],
}
