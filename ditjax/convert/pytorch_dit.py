"""Exact key map between PyTorch DiT/SiT state dicts and ditjax DiT parameters, both ways.

facebookresearch/DiT and willisma/SiT share one key set (SiT's model is DiT's, renamed). Torch stores
Linear weights [out, in] and the patch-embedding conv OIHW; ditjax stores kernels [..in, ..out] with
heads split out (qkv [D, 3, H, Dh], proj [H, Dh, D]) and the patch embedding as a matmul on
(row, col, channel)-ordered patches. Every transform is a transpose/reshape, so a float32 round trip
is bitwise. Everything here is NumPy: shape checks run before JAX builds or compiles anything.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from ditjax.models.archs import ARCHS, DTYPES, SIZES, DiTConfig
from ditjax.models.embeddings import TIMESTEP_FREQ_DIM, sincos_pos_embed_2d

POS_EMBED_KEY = "pos_embed"
POS_EMBED_ATOL = 1e-6
Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One tensor: its torch key and shape, our param path and shape, and how to move between them.

    kind: "linear" (torch [out, in] ↔ kernel = W.T reshaped), "conv" (OIHW ↔ (pi, pj, c)-ordered
    kernel), "vector" (biases, reshaped), "table" (embedding, unchanged).
    """

    torch_key: str
    path: tuple[str | int, ...]
    kind: str
    torch_shape: Shape
    shape: Shape


def _linear(torch_key: str, path: tuple, fan_in: Shape, fan_out: Shape) -> list[Leaf]:
    """A torch nn.Linear (weight + bias) whose kernel we store [*fan_in, *fan_out]."""
    n_in, n_out = math.prod(fan_in), math.prod(fan_out)
    return [Leaf(f"{torch_key}.weight", path + ("kernel",), "linear", (n_out, n_in), fan_in + fan_out),
            Leaf(f"{torch_key}.bias", path + ("bias",), "vector", (n_out,), fan_out)]


def _block_leaves(cfg: DiTConfig, prefix: str, path: tuple) -> list[Leaf]:
    """One block's tensors in torch state_dict order (attn, mlp, adaLN)."""
    d, h, m = cfg.hidden_size, cfg.num_heads, cfg.mlp_hidden
    return [*_linear(f"{prefix}.attn.qkv", path + ("attn", "qkv"), (d,), (3, h, d // h)),
            *_linear(f"{prefix}.attn.proj", path + ("attn", "proj"), (h, d // h), (d,)),
            *_linear(f"{prefix}.mlp.fc1", path + ("mlp", "fc1"), (d,), (m,)),
            *_linear(f"{prefix}.mlp.fc2", path + ("mlp", "fc2"), (m,), (d,)),
            *_linear(f"{prefix}.adaLN_modulation.1", path + ("modulation",), (d,), (6 * d,))]


def leaves(cfg: DiTConfig) -> list[Leaf]:
    """Every parameter tensor of an unscanned model, in torch ``state_dict()`` order (pos_embed excluded)."""
    _check_supported(cfg)
    d, p, c = cfg.hidden_size, cfg.patch_size, cfg.in_channels
    out = [Leaf("x_embedder.proj.weight", ("x_embedder", "proj", "kernel"), "conv", (d, c, p, p), (p * p * c, d)),
           Leaf("x_embedder.proj.bias", ("x_embedder", "proj", "bias"), "vector", (d,), (d,)),
           *_linear("t_embedder.mlp.0", ("t_embedder", "mlp_in"), (TIMESTEP_FREQ_DIM,), (d,)),
           *_linear("t_embedder.mlp.2", ("t_embedder", "mlp_out"), (d,), (d,)),
           Leaf("y_embedder.embedding_table.weight", ("y_embedder", "embedding_table"), "table",
                (cfg.num_classes + 1, d), (cfg.num_classes + 1, d))]
    for i in range(cfg.depth):
        out += _block_leaves(cfg, f"blocks.{i}", ("blocks", i))
    out += [*_linear("final_layer.linear", ("final_layer", "linear"), (d,), (p * p * cfg.out_channels,)),
            *_linear("final_layer.adaLN_modulation.1", ("final_layer", "modulation"), (d,), (2 * d,))]
    return out


def _check_supported(cfg: DiTConfig) -> None:
    """Configs whose weights mean something else than a torch DiT's with the same shapes."""
    problems = [f"mlp_type={cfg.mlp_type!r} (only 'dense')"] if cfg.mlp_type != "dense" else []
    if cfg.readout_scale != 1.0:
        problems.append(f"readout_scale={cfg.readout_scale} (fold it into final_layer.linear first)")
    if cfg.attn_scale is not None and not math.isclose(cfg.attn_scale, (cfg.hidden_size // cfg.num_heads) ** -0.5):
        problems.append(f"attn_scale={cfg.attn_scale} (torch DiT uses head_dim**-0.5)")
    if problems:
        raise ValueError(f"the PyTorch DiT/SiT key map does not cover {', '.join(problems)}")


def torch_shapes(cfg: DiTConfig) -> dict[str, Shape]:
    """The exact torch state dict (keys in ``state_dict()`` order → shapes) of a config."""
    # The model's own parameter (pos_embed) comes before its submodules' in state_dict().
    return {POS_EMBED_KEY: (1, cfg.num_tokens, cfg.hidden_size)} | {leaf.torch_key: leaf.torch_shape
                                                                     for leaf in leaves(cfg)}


def param_shapes(cfg: DiTConfig) -> dict[str, Shape]:
    """Our parameter paths ("blocks/0/attn/qkv/kernel"; scanned: "blocks/attn/qkv/kernel") → shapes."""
    if not cfg.scan_layers:
        return {_path_str(leaf.path): leaf.shape for leaf in leaves(cfg)}
    shapes = {}
    for leaf in leaves(cfg):
        if leaf.path[0] != "blocks":
            shapes[_path_str(leaf.path)] = leaf.shape
        elif leaf.path[1] == 0:
            shapes[_path_str(("blocks",) + leaf.path[2:])] = (cfg.depth,) + leaf.shape
    return shapes


def _path_str(path: tuple) -> str:
    return "/".join(str(k) for k in path)


def _shape_errors(got: Mapping[str, Any], expected: Mapping[str, Shape], what: str) -> list[str]:
    """Human-readable lines for every missing, unexpected or wrongly shaped entry."""
    lines = [f"  missing {k}: expected {list(s)}" for k, s in expected.items() if k not in got]
    lines += [f"  unexpected {k}: got {list(np.shape(got[k]))}" for k in got if k not in expected]
    lines += [f"  wrong shape {k}: expected {list(s)}, got {list(np.shape(got[k]))}"
              for k, s in expected.items() if k in got and tuple(np.shape(got[k])) != tuple(s)]
    if not lines:
        return []
    return [f"{what} does not match the model ({len(lines)} offending entries):"] + lines


def check_state_dict(state_dict: Mapping[str, Any], cfg: DiTConfig) -> None:
    """Raise ONE ValueError naming every missing, extra or wrongly shaped torch key (no JAX involved)."""
    lines = _shape_errors(state_dict, torch_shapes(cfg), f"state dict for {describe(cfg)}")
    if lines:
        try:
            lines.insert(1, f"  (its shapes look like {describe(infer_config(state_dict))})")
        except ValueError:
            pass
        raise ValueError("\n".join(lines))


def check_pos_embed(pos_embed: np.ndarray, cfg: DiTConfig) -> None:
    """pos_embed is rebuilt from the config, never loaded, so a checkpoint's must equal the sin-cos table."""
    grid = cfg.input_size // cfg.patch_size
    expected = sincos_pos_embed_2d(cfg.hidden_size, grid).astype(np.float32)
    diff = float(np.max(np.abs(np.asarray(pos_embed, np.float64)[0] - expected)))
    if not diff < POS_EMBED_ATOL:
        raise ValueError(f"pos_embed differs from the fixed 2-D sin-cos table of a {grid}x{grid} grid by "
                         f"{diff:.3g} (max abs, tolerance {POS_EMBED_ATOL}); ditjax regenerates positions, so a "
                         "learned or differently built pos_embed cannot be imported")


def from_torch(state_dict: Mapping[str, Any], cfg: DiTConfig) -> dict:
    """Torch state dict → ditjax pure param dict (as ``nnx.to_pure_dict`` gives), in cfg.param_dtype."""
    check_state_dict(state_dict, cfg)
    check_pos_embed(state_dict[POS_EMBED_KEY], cfg)
    dtype = np.dtype(DTYPES[cfg.param_dtype])
    flat: dict[tuple, np.ndarray] = {}
    for leaf in leaves(cfg):
        value = _to_ours(np.asarray(state_dict[leaf.torch_key]), leaf)
        if cfg.scan_layers and leaf.path[0] == "blocks":  # fill the stacked array in place: no per-layer copies
            path, layer = ("blocks",) + leaf.path[2:], leaf.path[1]
            if layer == 0:
                flat[path] = np.empty((cfg.depth,) + leaf.shape, dtype)
            flat[path][layer] = value
        else:
            flat[leaf.path] = np.asarray(value, dtype)
    return _unflatten(flat)


def to_torch(params: Mapping, cfg: DiTConfig) -> dict[str, np.ndarray]:
    """ditjax pure param dict → float32 torch state dict in ``state_dict()`` order.

    pos_embed is written too, because torch's ``load_state_dict`` is strict about it.
    """
    flat = {tuple(_int(k) for k in path): v for path, v in _flatten(params).items()}
    lines = _shape_errors({_path_str(k): v for k, v in flat.items()}, param_shapes(cfg),
                          f"params for {describe(cfg)}")
    if lines:
        raise ValueError("\n".join(lines))
    flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
    if cfg.scan_layers:
        flat = _unstack_blocks(flat, cfg.depth)
    grid = cfg.input_size // cfg.patch_size
    out = {POS_EMBED_KEY: sincos_pos_embed_2d(cfg.hidden_size, grid).astype(np.float32)[None]}
    for leaf in leaves(cfg):
        out[leaf.torch_key] = np.ascontiguousarray(_to_torch(flat[leaf.path], leaf))
    return out


def _to_ours(w: np.ndarray, leaf: Leaf) -> np.ndarray:
    if leaf.kind == "linear":
        return w.T.reshape(leaf.shape)
    if leaf.kind == "conv":
        return w.transpose(2, 3, 1, 0).reshape(leaf.shape)
    return w.reshape(leaf.shape)


def _to_torch(w: np.ndarray, leaf: Leaf) -> np.ndarray:
    if leaf.kind == "linear":
        n_out, n_in = leaf.torch_shape
        return w.reshape(n_in, n_out).T
    if leaf.kind == "conv":
        d, c, p, _ = leaf.torch_shape
        return w.reshape(p, p, c, d).transpose(3, 2, 0, 1)
    return w.reshape(leaf.torch_shape)


def _unstack_blocks(flat: dict[tuple, np.ndarray], depth: int) -> dict[tuple, np.ndarray]:
    """Stacked block leaves ("blocks", ...) → per-layer views ("blocks", i, ...)."""
    out = {k: v for k, v in flat.items() if k[0] != "blocks"}
    for key, value in flat.items():
        if key[0] == "blocks":
            out |= {("blocks", i) + key[1:]: value[i] for i in range(depth)}
    return out


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out |= _flatten(v, prefix + (k,))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: Mapping[tuple, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return tree


def _int(key: Any) -> Any:
    """Orbax restores integer dict keys as strings; block indices are ints in our trees."""
    return int(key) if isinstance(key, str) and key.isdigit() else key


def describe(cfg: DiTConfig) -> str:
    """One line naming the arch and the sizes that change the key shapes (for messages)."""
    arch = arch_name(cfg) or f"depth={cfg.depth} hidden={cfg.hidden_size} heads={cfg.num_heads} p={cfg.patch_size}"
    return (f"{arch} (input_size={cfg.input_size}, in_channels={cfg.in_channels}, "
            f"num_classes={cfg.num_classes}, learn_sigma={cfg.learn_sigma})")


def arch_name(cfg: DiTConfig) -> str | None:
    """The named arch ("DiT-XL/2") with this config's depth, width, heads and patch, if any."""
    for name, (size, p) in ARCHS.items():
        if SIZES[size] == (cfg.depth, cfg.hidden_size, cfg.num_heads) and p == cfg.patch_size:
            return name
    return None


def infer_config(state_dict: Mapping[str, Any], **overrides: Any) -> DiTConfig:
    """The config whose state dict has these shapes; the head count comes from the matching named arch.

    Shapes fix depth, width, patch, channels, classes, grid and learn_sigma, but not the number of heads
    (qkv is [3D, D] for any head count): a width/depth/patch with no named arch needs ``num_heads``.
    """
    def shape(key: str) -> Shape:
        if key not in state_dict:
            raise ValueError(f"cannot infer the architecture: key {key!r} is missing")
        return tuple(np.shape(state_dict[key]))

    d, c, p, _ = shape("x_embedder.proj.weight")
    depth = len({m.group(1) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))})
    tokens = shape(POS_EMBED_KEY)[1]
    grid = math.isqrt(tokens)
    out_rows = shape("final_layer.linear.weight")[0]
    if grid * grid != tokens or out_rows not in (p * p * c, 2 * p * p * c):
        raise ValueError(f"cannot infer the architecture: pos_embed has {tokens} tokens and the final linear "
                         f"{out_rows} rows for patch {p} and {c} channels")
    fields = dict(depth=depth, hidden_size=d, patch_size=p, in_channels=c, input_size=grid * p,
                  num_classes=shape("y_embedder.embedding_table.weight")[0] - 1,
                  learn_sigma=out_rows == 2 * p * p * c)
    heads = {SIZES[size][2] for size, patch in ARCHS.values() if SIZES[size][:2] == (depth, d) and patch == p}
    if "num_heads" not in overrides:
        if not heads:
            raise ValueError(f"no named arch has depth={depth}, hidden_size={d}, patch_size={p}; "
                             "pass the number of heads explicitly")
        fields["num_heads"] = heads.pop()
    return DiTConfig(**{**fields, **overrides}).validate()

