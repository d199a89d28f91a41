"""State-dict files: ``.safetensors`` and torch ``.pt`` (read without executing pickled code)."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from ditjax.convert import torch_zip

SAFETENSORS = ".safetensors"
TRAINING_DICT_KEYS = ("ema", "model")  # DiT/SiT find_model take "ema" when present


def read_state_dict(path: str | Path) -> tuple[dict[str, np.ndarray], str]:
    """(flat state dict, where it came from); a training dict yields its ``ema`` weights, else ``model``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix == SAFETENSORS:
        try:
            return dict(safetensors.numpy.load_file(path)), "safetensors state dict"
        except KeyError as err:  # safetensors.numpy has no bfloat16
            raise ValueError(f"{path}: dtype {err} cannot be read into NumPy; save it as float32 or .pt") from err
    return select_weights(torch_zip.load(path), path)


def select_weights(checkpoint: Any, path: str | Path) -> tuple[dict[str, np.ndarray], str]:
    """Pick the weights out of a loaded checkpoint: bare state dict, or a training dict's ema/model."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict")
    for key in TRAINING_DICT_KEYS:
        if isinstance(checkpoint.get(key), Mapping):
            return _flat(checkpoint[key], f"{path}[{key!r}]"), f"training dict, {key!r} weights"
    return _flat(checkpoint, str(path)), "bare state dict"


def _flat(tensors: Mapping, where: str) -> dict[str, np.ndarray]:
    bad = [f"{k!r} ({type(v).__name__})" for k, v in tensors.items()
           if not (isinstance(k, str) and isinstance(v, np.ndarray))]
    if bad:
        raise ValueError(f"{where} is not a flat state dict of tensors (and has no 'ema' or 'model' entry); "
                         f"offending entries: {', '.join(bad[:20])}")
    return dict(tensors)


def write_state_dict(tensors: Mapping[str, np.ndarray], path: str | Path) -> None:
    """Write by suffix: ``.safetensors``, else a torch zip that torch.load(weights_only=True) reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == SAFETENSORS:
        safetensors.numpy.save_file({k: np.asarray(v, order="C") for k, v in tensors.items()}, path)
    else:
        torch_zip.save(tensors, path)
