"""The device mesh built from ``config.mesh`` and the shardings derived from logical axes."""
from __future__ import annotations

import math
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ditjax.parallel.logical import logical_to_spec
from ditjax.parallel.rules import RULE_PRESETS

MESH_AXES = ("data", "fsdp", "tensor", "expert")


def mesh_shape(cfg: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Total size per axis (ICI × DCN), with one ``-1`` filled from the device count."""
    ici = {a: int(cfg[a]) for a in MESH_AXES}
    dcn = {a: int(cfg[f"dcn_{a}"]) for a in MESH_AXES}
    if any(v == 0 or v < -1 for v in ici.values()) or any(v < 1 for v in dcn.values()):
        raise ValueError(f"mesh sizes must be positive (or -1 to fill): ici={ici}, dcn={dcn}")
    unknown = [a for a, v in ici.items() if v == -1]
    if len(unknown) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {unknown}")
    known = math.prod(v for v in ici.values() if v != -1) * math.prod(dcn.values())
    if unknown:
        if num_devices % known:
            raise ValueError(f"mesh {cfg.to_dict()} cannot fill {num_devices} devices: {known} does not divide it")
        ici[unknown[0]] = num_devices // known
    total = {a: ici[a] * dcn[a] for a in MESH_AXES}
    if math.prod(total.values()) != num_devices:
        raise ValueError(f"mesh {total} uses {math.prod(total.values())} devices but {num_devices} are present; "
                         "set the sizes so their product is the device count (one may be -1)")
    return total


def make_mesh(cfg: ml_collections.ConfigDict, devices: list[jax.Device] | None = None) -> Mesh:
    """Mesh over all devices (ICI axes inside a slice, DCN axes across slices), Auto axis types."""
    devices = list(devices or jax.devices())
    total = mesh_shape(cfg, len(devices))
    dcn = [int(cfg[f"dcn_{a}"]) for a in MESH_AXES]
    ici = [total[a] // d for a, d in zip(MESH_AXES, dcn)]
    if math.prod(dcn) > 1:
        from jax.experimental import mesh_utils
        array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices, allow_split_physical_axes=True)
    else:
        try:
            from jax.experimental import mesh_utils
            array = mesh_utils.create_device_mesh(ici, devices=devices, allow_split_physical_axes=True)
        except (AssertionError, NotImplementedError, ValueError):
            array = np.asarray(devices).reshape(ici)
    return Mesh(array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def resolve_rules(rules: str | list) -> list:
    if isinstance(rules, str):
        if rules not in RULE_PRESETS:
            raise ValueError(f"unknown sharding rules {rules!r}; presets: {sorted(RULE_PRESETS)}")
        return RULE_PRESETS[rules]
    return list(rules)


def _divisible_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes that do not divide a dimension (e.g. a 10-row class table over 8 devices)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        out.append(axes if size and dim % size == 0 else None)
    return PartitionSpec(*out)


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules: list) -> dict:
    """A pure-dict tree of NamedShardings, one per parameter, from each Param's ``axes`` metadata."""
    def sharding(variable: nnx.Variable) -> NamedSharding:
        axes = variable.get_metadata().get("axes") or (None,) * variable.value.ndim
        spec = logical_to_spec(axes, rules, mesh.axis_names)
        return NamedSharding(mesh, _divisible_spec(spec, variable.value.shape, mesh))

    tree = jax.tree.map(sharding, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(tree)


def batch_sharding(mesh: Mesh, rules: list, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def tree_shardings_like(tree: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda _: replicated(mesh), tree)
