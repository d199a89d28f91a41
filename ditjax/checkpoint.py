"""Checkpoint directories: one layout for training runs and converted weights.

    <dir>/config.json               the run config (model, objective, …) as JSON
    <dir>/checkpoints/<step>/state  params, EMA, optimizer state, step, RNG (Orbax, sharding-aware)
    <dir>/checkpoints/<step>/data   data-iterator state (JSON), so resume continues with the next batch

Orbax writes each step into a temporary directory and renames it when complete, so a failed save never
touches the previous checkpoint. A latest checkpoint that fails to restore is moved aside (never deleted)
and the previous one is used.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from ditjax.models import DiT, DiTConfig

log = logging.getLogger(__name__)
CONFIG_FILE = "config.json"


def write_config(directory: str | os.PathLike, run_config: dict) -> None:
    """Write config.json atomically (temp file + rename), from process 0 only."""
    if jax.process_index() != 0:
        return
    path = Path(directory) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(run_config, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {directory} is not a ditjax checkpoint or training directory")
    return json.loads(path.read_text())


def model_config(run_config: dict) -> DiTConfig:
    """The DiTConfig stored in a run config (unknown keys are an error, not silently dropped)."""
    fields = {f for f in DiTConfig.__dataclass_fields__}
    model = {k: v for k, v in run_config["model"].items() if k != "arch"}
    unknown = sorted(set(model) - fields)
    if unknown:
        raise ValueError(f"config.json model section has unknown keys {unknown}")
    return DiTConfig(**model).validate()


class CheckpointManager:
    """Orbax manager keeping the last ``keep_last`` checkpoints plus every ``keep_every``-th step."""

    def __init__(self, directory: str | os.PathLike, *, keep_last: int = 2, keep_every: int | None = None,
                 async_save: bool = True):
        self.root = Path(directory).absolute() / "checkpoints"
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=keep_last, keep_period=keep_every or None, enable_async_checkpointing=async_save,
            create=True)
        self._open()

    def _open(self) -> None:
        self._manager = ocp.CheckpointManager(self.root, options=self._options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict | None = None, *, force: bool = False) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state or {}))
        self._manager.save(step, args=args, force=force)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any | None) -> tuple[Any, dict]:
        state_args = ocp.args.StandardRestore(abstract_state) if abstract_state is not None else ocp.args.StandardRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(state=state_args, data=ocp.args.JsonRestore()))
        return restored["state"], restored["data"] or {}

    def restore_latest_good(self, abstract_state: Any | None,
                            validate: Callable[[Any], None] | None = None) -> tuple[int, Any, dict] | None:
        """Restore the newest checkpoint that loads; move unreadable ones aside with a warning."""
        for step in reversed(self.all_steps()):
            try:
                state, data = self.restore(step, abstract_state)
                if validate is not None:
                    validate(state)
                return step, state, data
            except Exception as err:  # a truncated/corrupt checkpoint surfaces as many error types
                aside = self.root.parent / f"checkpoints_corrupt/{step}-{int(time.time())}"
                log.warning("checkpoint step %d could not be restored (%s: %s); moving it to %s and trying the "
                            "previous one", step, type(err).__name__, str(err)[:300], aside)
                if jax.process_index() == 0:
                    aside.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(self.root / str(step), aside)
                self._open()
        return None

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def save_inference_checkpoint(directory: str | os.PathLike, run_config: dict, params: dict, step: int = 0) -> None:
    """Write converted or exported weights as a checkpoint directory that `ditjax.sample` reads."""
    write_config(directory, run_config)
    manager = CheckpointManager(directory, keep_last=1, async_save=False)
    manager.save(step, {"params": params}, force=True)
    manager.close()


def load_inference_checkpoint(directory: str | os.PathLike, *, prefer_ema: bool = True,
                              step: int | None = None) -> tuple[dict, DiT]:
    """Load (run_config, model) with EMA weights when present, else the raw parameters."""
    run_config = read_config(directory)
    model = nnx.eval_shape(lambda: DiT(model_config(run_config), rngs=nnx.Rngs(0)))
    manager = CheckpointManager(directory, async_save=False)
    if step is None:
        found = manager.restore_latest_good(None)
        if found is None:
            raise FileNotFoundError(f"no readable checkpoint under {manager.root}")
        step, state, _ = found
    else:
        state, _ = manager.restore(step, None)
    manager.close()
    key = "ema" if prefer_ema and state.get("ema") is not None else "params"
    log.info("loaded %s weights of step %d from %s", key, step, directory)
    graphdef, abstract = nnx.split(model)
    nnx.replace_by_pure_dict(abstract, state[key])
    return run_config, nnx.merge(graphdef, abstract)
