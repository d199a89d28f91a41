"""The device mesh built from ``config.mesh`` and the shardings derived from logical axes."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ditjax.parallel.logical import logical_to_spec
from ditjax.parallel.rules import MESH_AXES, Rule, rules_from_config


def mesh_shape(cfg: Mapping, num_devices: int) -> dict[str, int]:
    """Total size per axis (ICI × DCN), with one ``-1`` filled from the device count."""
    ici = {a: int(cfg[a]) for a in MESH_AXES}
    dcn = {a: int(cfg[f"dcn_{a}"]) for a in MESH_AXES}
    if any(v == 0 or v < -1 for v in ici.values()) or any(v < 1 for v in dcn.values()):
        raise ValueError(f"mesh sizes must be positive (or -1 to fill): ici={ici}, dcn={dcn}")
    unknown = [a for a, v in ici.items() if v == -1]
    if len(unknown) > 1:
        raise ValueError(f"only one of mesh.{', mesh.'.join(unknown)} may be -1")
    known = math.prod(v for v in ici.values() if v != -1) * math.prod(dcn.values())
    if unknown:
        if num_devices % known:
            raise ValueError(f"mesh.{unknown[0]}=-1 cannot be filled: the other axes use {known} devices, which "
                             f"does not divide the {num_devices} devices present")
        ici[unknown[0]] = num_devices // known
    total = {a: ici[a] * dcn[a] for a in MESH_AXES}
    if math.prod(total.values()) != num_devices:
        sizes = " × ".join(f"{a}={n}" for a, n in total.items() if n > 1) or "1"
        raise ValueError(f"mesh {sizes} needs {math.prod(total.values())} devices but {num_devices} are present; "
                         "make the sizes multiply to the device count (one may be -1)")
    return total


def make_mesh(cfg: Mapping, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh over all devices (ICI axes inside a slice, DCN axes across slices), Auto axis types.

    The DCN granules are TPU slices where devices report several ``slice_index`` values; otherwise (GPU
    nodes, CPU processes) each process is one granule.
    """
    devices = list(devices or jax.devices())
    total = mesh_shape(cfg, len(devices))
    dcn = [int(cfg[f"dcn_{a}"]) for a in MESH_AXES]
    ici = [total[a] // d for a, d in zip(MESH_AXES, dcn)]
    if math.prod(dcn) > 1:
        array = mesh_utils.create_hybrid_device_mesh(
            ici, dcn, devices=devices, allow_split_physical_axes=True,
            process_is_granule=len({getattr(d, "slice_index", 0) for d in devices}) == 1)
    else:
        try:
            array = mesh_utils.create_device_mesh(ici, devices=devices, allow_split_physical_axes=True)
        except (AssertionError, NotImplementedError, ValueError):  # no topology information (CPU, subsets)
            array = np.asarray(devices).reshape(ici)
    return Mesh(array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def resolve_rules(rules: str | Sequence[Rule] | Mapping) -> list[Rule]:
    """Rules from a ``config.mesh`` section (preset + custom rules), a preset name, or an explicit list."""
    if isinstance(rules, Mapping) or hasattr(rules, "to_dict"):
        return rules_from_config(rules)
    if isinstance(rules, str):
        return rules_from_config({"rules": rules})
    return list(rules)


def param_spec(variable: nnx.Variable, mesh: Mesh, rules: Sequence[Rule]) -> PartitionSpec:
    axes = variable.get_metadata().get("axes") or (None,) * len(variable.get_value().shape)
    return logical_to_spec(axes, rules, dict(mesh.shape), variable.get_value().shape)


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules: Sequence[Rule]) -> dict:
    """A pure-dict tree of NamedShardings, one per parameter, from each Param's ``axes`` metadata.

    A dimension that no rule's mesh axes divide stays whole (e.g. an 11-row class table over 8 devices).
    """
    tree = jax.tree.map(lambda v: NamedSharding(mesh, param_spec(v, mesh, rules)), abstract_state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(tree)


def batch_sharding(mesh: Mesh, rules: Sequence[Rule], ndim: int) -> NamedSharding:
    sharding = NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, dict(mesh.shape)))
    check_hosts_own_disjoint_rows(sharding)
    return sharding


def check_hosts_own_disjoint_rows(sharding: NamedSharding) -> None:
    """Each host reads its own 1/P of every global batch, so the batch split must give every process an
    equal, disjoint set of rows; a mesh whose batch axes do not separate the processes (e.g. a tensor
    axis spanning hosts with nothing else split) would silently feed replicas different examples."""
    processes = {d.process_index for d in sharding.mesh.devices.flat}
    if len(processes) == 1:
        return
    entry = sharding.spec[0] if len(sharding.spec) else None
    shards = math.prod(sharding.mesh.shape[a] for a in ((entry,) if isinstance(entry, str) else entry or ()))
    rows: dict[int, set[int]] = {p: set() for p in processes}
    for device, index in sharding.devices_indices_map((shards,)).items():
        rows[device.process_index].update(range(*index[0].indices(shards)))
    if any(len(r) * len(processes) != shards for r in rows.values()) or len(set().union(*rows.values())) != shards:
        raise ValueError(f"the batch is split {sharding.spec[0]} over mesh {dict(sharding.mesh.shape)}, which does "
                         f"not give each of the {len(processes)} processes its own rows; put a batch axis (data, "
                         "fsdp, expert) across hosts, e.g. the dcn_* axes or the outermost in-slice axis")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def gather_to_host(tree: Any, mesh: Mesh) -> Any:
    """Numpy copy of a (possibly multi-host sharded) tree: replicate on the mesh, then read the local copy.

    ``jax.device_get`` alone fails on arrays whose shards live on other processes (FSDP across hosts).
    """
    return jax.device_get(jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree))

