"""Logical-axis annotations: the contract between the model and the device mesh.

Every parameter carries an ``axes`` tuple of logical names (``embed``, ``mlp``, ``heads``…) and key
activations are constrained with :func:`constrain`. Rules that map logical names to mesh axes are
installed for a region of code with :func:`axis_rules`; outside such a region constraints are no-ops,
so the model runs unchanged on one device.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalAxes = tuple[str | None, ...]
Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("ditjax_axis_rules", default=None)


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Activate logical→mesh rules (used while tracing the train step)."""
    token = _ACTIVE.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def logical_to_spec(axes: LogicalAxes, rules: Rules, mesh_shape: Mapping[str, int] | None = None,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
    """Map logical names to a PartitionSpec, rules taken in priority order.

    Each rule ``(name, mesh axes)`` claims the still-unassigned dimension called ``name`` if its mesh axes
    are unused in this array and (when ``shape`` is given) their product divides the dimension; a rule
    with no mesh axes pins the dimension as replicated. A name may have several rules: the later ones
    are fallbacks, e.g. FSDP over 256 devices shards the MLP dimension of a kernel whose width (1152)
    256 does not divide. Mesh axes absent from ``mesh_shape`` are ignored.
    """
    assigned: dict[int, tuple[str, ...]] = {}
    used: set[str] = set()
    for name, target in rules:
        dims = [i for i, a in enumerate(axes) if a == name and i not in assigned]
        if not dims:
            continue
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        if mesh_shape is not None:
            targets = tuple(t for t in targets if t in mesh_shape)
        if target is not None and not targets:
            continue
        if any(t in used for t in targets):
            continue
        size = math.prod(mesh_shape[t] for t in targets) if mesh_shape is not None else 1
        if shape is not None and shape[dims[0]] % size:
            continue
        assigned[dims[0]] = targets
        used.update(targets)
    spec = []
    for i in range(len(axes)):
        targets = assigned.get(i, ())
        spec.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return PartitionSpec(*spec)


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
    """Sharding constraint on an activation by logical names (no-op without active rules)."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(axes, rules, dict(mesh.shape), x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def shard_over_mesh(fn: Callable[..., jax.Array], axes: LogicalAxes) -> Callable[..., jax.Array]:
    """Run a per-device kernel on each shard (``shard_map``) with arguments and result laid out by ``axes``.

    For kernels XLA cannot partition itself (Pallas attention): without this, a sharded train step would
    gather their inputs onto every device. Outside :func:`axis_rules` the kernel runs as is.
    """
    active = _ACTIVE.get()
    if active is None:
        return fn
    mesh, rules = active

    def sharded(*args: jax.Array) -> jax.Array:
        spec = logical_to_spec(axes, rules, dict(mesh.shape), args[0].shape)
        return jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * len(args), out_specs=spec, check_vma=False)(*args)

    return sharded
