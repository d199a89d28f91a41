"""Which μP role each DiT parameter plays, read off its shape against a base-width model.

As in microsoft/mup's ``infshape``: a dimension is *infinite* if it differs between the base model
(built abstractly at ``base_hidden_size``/``base_num_heads``, same depth and experts) and a *delta*
model, so nothing here knows layer names. The delta is the model itself when its width differs from the
base; at the base width (where nothing differs) it is the base at twice the width and heads, as mup's
``set_base_shapes(model, base, delta=…)`` needs a delta there too (DiT-μP: base 288, delta 360). Our kernels may be multi-dimensional (qkv is [D, 3, heads, head_dim]),
so dimensions are grouped by the :class:`~ditjax.models.layers.Dense` layout: the first ``n_in`` dims are
fan-in, the rest fan-out; a Dense bias has no fan-in. Other parameters with ≥2 dims (the label table
[vocab, D]) count their first dim as fan-in (a lookup is a one-hot matmul). Leading stacked axes
(``layers`` from scanning, ``expert``) are batch-like: never fan-in or fan-out.

| fan-in infinite | fan-out infinite | role |
|---|---|---|
| yes | yes | hidden (lr/m, wd·m, N(0, 1/fan_in)) |
| yes | no | output (readout: zero init, forward × output_mult/m) |
| no | yes or no | input (N(0, 1/fan_in); a ``vocab`` table N(0, 1)) |
| no fan-in dims (biases) | | vector (zero init) |

A matrix with no infinite dim follows the input rules (its fan-in is finite, so nothing scales).
"""
from __future__ import annotations

import dataclasses
import math

from flax import nnx

from ditjax.models import DiT, DiTConfig
from ditjax.models.layers import Dense

ROLES = ("input", "hidden", "output", "vector")
STACK_AXES = frozenset({"layers", "expert"})


@dataclasses.dataclass(frozen=True)
class ParamRole:
    """One parameter's μP class; ``width_mult`` is fan_in / base fan_in (mup's ``width_mult()``)."""

    role: str
    fan_in: int
    width_mult: float
    lookup: bool  # an embedding table: μP keeps torch's N(0, 1) init


@dataclasses.dataclass(frozen=True)
class _Layout:
    shape: tuple[int, ...]
    n_stack: int  # leading batch-like axes
    n_in: int  # fan-in dims after the stacked ones
    lookup: bool


def _layouts(cfg: DiTConfig) -> dict[tuple, _Layout]:
    """Path → layout of every parameter, from an abstract (never allocated) model."""
    model = nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0)))
    n_in = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Dense):
            n_in[path + ("kernel",)] = node.n_in
            n_in[path + ("bias",)] = 0
    out = {}
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Param):
            continue
        axes = tuple(node.get_metadata().get("axes") or (None,) * node.ndim)
        n_stack = next((i for i, a in enumerate(axes) if a not in STACK_AXES), len(axes))
        rest = len(axes) - n_stack
        out[path] = _Layout(tuple(node.shape), n_stack, n_in.get(path, 1 if rest >= 2 else 0),
                            lookup=path not in n_in and axes[n_stack] == "vocab")
    return out


def classify(layout: _Layout, base: _Layout, delta: _Layout) -> ParamRole:
    """The role of one parameter given its own, its base-model and its delta-model layout."""
    if not len(layout.shape) == len(base.shape) == len(delta.shape):
        raise ValueError(f"shapes {layout.shape}, base {base.shape}, delta {delta.shape} differ in rank")
    dims, base_dims, delta_dims = (x.shape[x.n_stack:] for x in (layout, base, delta))
    k = layout.n_in
    fan_in, base_fan_in = math.prod(dims[:k]), math.prod(base_dims[:k])
    if k == 0:
        return ParamRole("vector", 1, 1.0, False)
    inf_in, inf_out = delta_dims[:k] != base_dims[:k], delta_dims[k:] != base_dims[k:]
    if inf_in:
        return ParamRole("hidden" if inf_out else "output", fan_in, fan_in / base_fan_in, False)
    return ParamRole("input", fan_in, 1.0, layout.lookup)


def delta_config(model_cfg: DiTConfig, base_cfg: DiTConfig) -> DiTConfig:
    """The model itself if wider than the base, else the base at twice the width and heads."""
    if model_cfg.hidden_size != base_cfg.hidden_size:
        return model_cfg
    return dataclasses.replace(base_cfg, hidden_size=2 * base_cfg.hidden_size, num_heads=2 * base_cfg.num_heads)


def param_roles(model_cfg: DiTConfig, base_cfg: DiTConfig) -> dict:
    """A pure-dict tree (like ``nnx.to_pure_dict`` params) of :class:`ParamRole` leaves."""
    layouts, base = _layouts(model_cfg), _layouts(base_cfg)
    delta_cfg = delta_config(model_cfg, base_cfg)
    delta = layouts if delta_cfg is model_cfg else _layouts(delta_cfg)
    if not layouts.keys() == base.keys() == delta.keys():
        raise ValueError("the base model has different parameters; only widths may differ from the base")
    tree: dict = {}
    for path, layout in layouts.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = classify(layout, base[path], delta[path])
    return tree
