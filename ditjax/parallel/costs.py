"""Analytic per-device memory and communication of a sharding strategy, from the real rules.

The shard sizes use the trainer's own :func:`~ditjax.parallel.logical.logical_to_spec` on a mesh *shape*,
so any device count can be costed without devices; ``python -m ditjax.plan`` checks them against XLA's
buffer assignment of the compiled step. Communication counts the bytes each device sends per step with
ring collectives (an all-gather or reduce-scatter of S bytes over n devices sends S·(n-1)/n; an
all-reduce twice that):

* FSDP: parameters all-gathered for the forward, gradients reduce-scattered; with rematerialisation the
  backward gathers them again (without it XLA keeps the gathered copy, which the compiled step's
  temporaries show).
* DP: the gradient shard each device keeps is all-reduced across data replicas.
* TP (Megatron): two activation all-reduces per block in the forward and two in the backward.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from ditjax.models import DiTConfig
from ditjax.parallel.chips import Chip
from ditjax.parallel.logical import logical_to_spec
from ditjax.parallel.rules import MESH_AXES, Rule


def shard_elements(shape: Sequence[int], spec: Sequence, mesh_shape: Mapping[str, int]) -> int:
    out = 1
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        out *= dim // math.prod(mesh_shape[a] for a in names)
    return out


def param_bytes_per_device(abstract_state: nnx.State, rules: Sequence[Rule], mesh_shape: Mapping[str, int]) -> int:
    """Bytes of one copy of the parameters held by each device (EMA and each Adam moment are the same)."""
    total = 0
    for var in jax.tree.leaves(abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        value = var.get_value()
        axes = var.get_metadata().get("axes") or (None,) * len(value.shape)
        spec = logical_to_spec(axes, rules, mesh_shape, value.shape)
        total += shard_elements(value.shape, spec, mesh_shape) * np.dtype(value.dtype).itemsize
    return total


def communication_bytes(param_bytes: float, mesh_shape: Mapping[str, int], cfg: DiTConfig, global_batch: int,
                        grad_accum_steps: int = 1) -> dict[str, float]:
    """Bytes each device sends per optimizer step, by collective (see the module docstring).

    Gathers and reductions repeat for every micro-batch of gradient accumulation.
    """
    d = mesh_shape["data"] * mesh_shape["expert"]
    f, t = mesh_shape["fsdp"], mesh_shape["tensor"]
    per_tp = param_bytes / t
    out: dict[str, float] = {}
    if f > 1:
        gathers = 1 if cfg.remat_policy == "none" else 2
        out["fsdp_all_gather"] = gathers * (f - 1) / f * per_tp * grad_accum_steps
        out["fsdp_reduce_scatter"] = (f - 1) / f * per_tp * grad_accum_steps
    if d > 1:
        out["dp_all_reduce"] = 2 * (d - 1) / d * per_tp / f * grad_accum_steps
    if t > 1:
        act_bytes = np.dtype(cfg.dtype).itemsize
        tokens_per_device = global_batch / (d * f) * cfg.num_tokens
        activation = tokens_per_device * cfg.hidden_size * act_bytes
        out["tp_all_reduce"] = cfg.depth * 4 * 2 * (t - 1) / t * activation
    return out


def axis_bandwidth(chip: Chip, mesh_shape: Mapping[str, int], axis: str) -> float | None:
    """Link bandwidth a collective over ``axis`` sees: the fast interconnect while the axis group and the
    faster-varying axes after it fit in one island (node / pod), else the scale-out network."""
    span = math.prod(mesh_shape[a] for a in MESH_AXES[MESH_AXES.index(axis):])
    return chip.link_bandwidth if span <= chip.island else chip.scale_out_bandwidth


COLLECTIVE_AXIS = {"fsdp_all_gather": "fsdp", "fsdp_reduce_scatter": "fsdp", "dp_all_reduce": "data",
                   "tp_all_reduce": "tensor"}


def communication_seconds(comm: Mapping[str, float], chip: Chip, mesh_shape: Mapping[str, int]) -> float | None:
    """Serial time of all collectives at link bandwidth; None where the network is not modelled."""
    total = 0.0
    for name, nbytes in comm.items():
        bandwidth = axis_bandwidth(chip, mesh_shape, COLLECTIVE_AXIS[name])
        if bandwidth is None:
            return None
        total += nbytes / bandwidth
    return total


STRATEGIES = {  # name: mesh sizes for n devices
    "DP": lambda n: {"data": n},
    "FSDP": lambda n: {"fsdp": n},
    "FSDP+TP": lambda n: {"fsdp": n // 2, "tensor": 2},
}
STRATEGY_RULES = {"DP": "dp", "FSDP": "fsdp", "FSDP+TP": "fsdp_tp"}


def strategy_table(archs: Sequence[str] = ("DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2"),
                   devices: Sequence[int] = (8, 64, 256), global_batch: int = 256) -> str:
    """Markdown: train state (params + EMA + Adam) per device and bytes sent per step, for docs/scaling.md."""
    from ditjax.models import DiT, dit_config
    from ditjax.parallel.rules import RULE_PRESETS

    gib, gb = 2**30, 1e9
    head = " | ".join(f"{n} devices" for n in devices)
    lines = [f"| model | params | strategy | {head} |", "|---|---|---|" + "---|" * len(devices)]
    for arch in archs:
        cfg = dit_config(arch, input_size=32)
        state = nnx.state(nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0))))
        full = param_bytes_per_device(state, RULE_PRESETS["dp"], dict.fromkeys(MESH_AXES, 1))
        for name, sizes in STRATEGIES.items():
            cells = []
            for n in devices:
                shape = {**dict.fromkeys(MESH_AXES, 1), **sizes(n)}
                held = 4 * param_bytes_per_device(state, RULE_PRESETS[STRATEGY_RULES[name]], shape)
                sent = sum(communication_bytes(full, shape, cfg, global_batch).values())
                cells.append(f"{held / gib:.3g} GiB / {sent / gb:.3g} GB")
            lines.append(f"| {arch} | {full / 4 / 1e6:.0f}M | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(strategy_table())
