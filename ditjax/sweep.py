"""Hyperparameter sweeps written inside config files, big_vision style.

A config file may define ``get_sweep(arg=None)`` next to ``get_config``; it returns
a list of *points*, each a flat dict of dotted-key overrides::

        from ditjax import sweep as hyper

        def get_sweep(arg=None):
            return hyper.product(
                    hyper.sweep("model.parametrization", ["sp", "mup"]),
                    hyper.sweep("model.hidden_size", hyper.log2_range(6, 9)),
                    hyper.sweep("optim.lr", hyper.log2_range(-13, -9)),
                    hyper.fixed("seed", 0),
            )

``launch/sweep.py`` turns each point into one training run whose overrides are passed
as ``--config.<key>=<value>``.  This module only builds and names points; it imports
nothing heavy, so the launcher runs on a machine without JAX.
"""
from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

Point = dict[str, Any]


def sweep(name: str, values: Iterable[Any]) -> list[Point]:
    """One key taking each of ``values`` in turn."""
    return [{name: v} for v in values]


def fixed(name: str, value: Any) -> list[Point]:
    """One key held at ``value``; a one-point sweep, so it composes with product/zipit."""
    return [{name: value}]


def product(*sweeps: Sequence[Point]) -> list[Point]:
    """Cartesian product; the first sweep varies slowest (as in nested for-loops)."""
    _check(sweeps, "product")
    return [_merge(combo) for combo in itertools.product(*sweeps)]


def zipit(*sweeps: Sequence[Point]) -> list[Point]:
    """Pairs the i-th points of equally long sweeps (e.g. width with its head count)."""
    _check(sweeps, "zipit")
    lengths = {len(s) for s in sweeps}
    if len(lengths) > 1:
        raise ValueError(f"zipit needs sweeps of equal length, got lengths {sorted(lengths)}")
    return [_merge(combo) for combo in zip(*sweeps)]


def log2_range(lo: int, hi: int, step: int = 1) -> list[int | float]:
    """``2**e`` for e in lo..hi inclusive: ints for e >= 0 (widths), floats below (lrs)."""
    if step <= 0:
        raise ValueError(f"step must be positive, got {step}")
    return [2**e for e in range(lo, hi + 1, step)]


def _check(sweeps: Sequence[Sequence[Point]], fn: str) -> None:
    # Catches big_vision's list-argument spelling, hyper.product([a, b]), early.
    for s in sweeps:
        if not all(isinstance(p, dict) for p in s):
            raise TypeError(f"{fn}() takes sweeps (lists of dicts) as separate arguments, got {s!r}")


def _merge(points: Iterable[Point]) -> Point:
    merged: Point = {}
    for p in points:
        clash = merged.keys() & p.keys()
        if clash:
            raise ValueError(f"key(s) {sorted(clash)} set by more than one sweep")
        merged.update(p)
    return merged


# ----------------------------------------------------------------------------- names


def _canonical(overrides: Point) -> str:
    # JSON keeps 1, 1.0 and True apart, as they are different config values.
    return json.dumps(overrides, sort_keys=True, separators=(",", ":"), default=repr)


def point_hash(overrides: Point) -> str:
    """8 hex digits of the canonical overrides: same overrides, same hash, any key order."""
    return hashlib.sha1(_canonical(overrides).encode()).hexdigest()[:8]


def slugify(text: str) -> str:
    """Keeps only characters that are safe in paths, job names and URLs."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-")


def _fmt(value: Any) -> str:
    return slugify(f"{value:.3g}" if isinstance(value, float) else str(value))


def point_name(overrides: Point, max_len: int = 80) -> str:
    """A readable, filesystem-safe name such as ``hidden_size=128_lr=0.000977_2f8eb649``.

    Only the point's own overrides go in (sorted by key), so a name never changes when
    points are added to or reordered in the sweep; the hash keeps truncated or
    rounded names unique.
    """
    readable = "_".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in sorted(overrides.items()))
    return f"{readable[:max_len]}_{point_hash(overrides)}" if readable else point_hash(overrides)


# ----------------------------------------------------------------------------- configs


def parse_config_spec(spec: str) -> tuple[Path, str | None]:
    """Splits ``configs/x.py:arg`` the way ml_collections' config_flags does."""
    path, sep, arg = spec.partition(":")
    return Path(path), (arg if sep else None)


def load_config_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_ditjax_config_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"cannot load config file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_sweep(config_spec: str) -> list[Point]:
    """Expands the config's ``get_sweep(arg)`` and checks it before anything launches.

    Checks: every point is a dict of str keys, no two points are identical (they would
    share a workdir), and, when the file has ``get_config``, every key exists in the
    config, because config_flags rejects unknown keys only once each run starts.
    """
    path, arg = parse_config_spec(config_spec)
    module = load_config_module(path)
    if not hasattr(module, "get_sweep"):
        raise ValueError(f"{path} defines no get_sweep()")
    points = list(module.get_sweep(arg))
    seen = set()
    for p in points:
        if not isinstance(p, dict) or not all(isinstance(k, str) for k in p):
            raise TypeError(f"get_sweep() must return dicts of dotted-key overrides, got {p!r}")
        if _canonical(p) in seen:
            raise ValueError(f"duplicate sweep point {p}")
        seen.add(_canonical(p))
    if hasattr(module, "get_config"):
        config = module.get_config(arg) if arg is not None else module.get_config()
        unknown = sorted({k for p in points for k in p if not _has_key(config, k)})
        if unknown:
            raise KeyError(f"sweep keys not in {path}'s config: {unknown}")
    return points


def _has_key(config: Any, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node.keys():  # also stops at a leaf reached early
            return False
        node = node[part]
    return True
