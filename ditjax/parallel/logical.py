"""Logical-axis annotations: the contract between the model and the device mesh.

Every parameter carries an ``axes`` tuple of logical names (``embed``, ``mlp``, ``heads``…) and key
activations are constrained with :func:`constrain`. Rules that map logical names to mesh axes are
installed for a region of code with :func:`axis_rules`; outside such a region constraints are no-ops,
so the model runs unchanged on one device.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

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


def logical_to_spec(axes: LogicalAxes, rules: Rules, mesh_axis_names: Sequence[str] = ()) -> PartitionSpec:
    """Map logical names to a PartitionSpec; the first rule for a name wins, a mesh axis is used once."""
    table: dict[str, str | tuple[str, ...] | None] = {}
    for name, target in rules:
        table.setdefault(name, target)
    used: set[str] = set()
    spec = []
    for name in axes:
        target = table.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        if mesh_axis_names:
            targets = tuple(t for t in targets if t in mesh_axis_names)
        targets = tuple(t for t in targets if t not in used)
        used.update(targets)
        spec.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return PartitionSpec(*spec)


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
    """Sharding constraint on an activation by logical names (no-op without active rules)."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(axes, rules, mesh.axis_names)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
