"""Precomputed VAE-latent datasets: a writer for users' extraction scripts and the matching reader.

Training DiT at 256px on pixels would spend most of its time in the VAE encoder, so the references
(fast-DiT, REPA) encode the dataset once. A latent dataset is a directory:

  metadata.json          {"format": "ditjax_latents", "kind", "stored_shape_hwc", "dtype", ...}
  latents.array_record   one record per example: int64 label (little-endian) + the array bytes

Records are always stored HWC (NHWC datasets), converted from PyTorch's NCHW at write time so
reading needs no transpose. Two kinds:
  moments  [h, w, 2c] = concat(mean, std) of the VAE posterior over channels, as REPA/EDM2 store
           them; the reader draws z = mean + std * eps afresh for every example it yields, so
           each epoch sees a new posterior sample.
  samples  [h, w, c] already sampled latents (fast-DiT style).
The reader multiplies by the latent scale (SD-VAE: 0.18215) unless the writer was told the stored
samples are already scaled. Output is float32 HWC.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from ditjax.data.errors import DatasetMissingError

FORMAT = "ditjax_latents"
FORMAT_VERSION = 1
META_FILE = "metadata.json"
RECORDS_FILE = "latents.array_record"
KINDS = ("moments", "samples")
_LABEL = np.dtype("<i8")


@dataclasses.dataclass(frozen=True)
class LatentMeta:
    """Contents of metadata.json: enough to size and decode records without reading one."""

    kind: str
    stored_shape_hwc: tuple[int, int, int]
    dtype: str
    num_examples: int
    num_classes: int
    already_scaled: bool

    @property
    def latent_shape_hwc(self) -> tuple[int, int, int]:
        """Shape of the latent the model sees (moments hold twice the channels)."""
        h, w, c = self.stored_shape_hwc
        return (h, w, c // 2) if self.kind == "moments" else (h, w, c)


class LatentWriter:
    """Incremental writer, for datasets too large to hold in memory (ImageNet: ~40 GB of moments).

    Usage, inside an extraction loop over a PyTorch VAE:
        with LatentWriter(path, kind="moments", layout="NCHW") as w:
            for x, y in loader:
                d = vae.encode(x).latent_dist
                w.write(torch.cat([d.mean, d.std], 1).cpu().numpy(), y.numpy())
    Everything lands in a temporary sibling directory renamed to `path` on a clean exit, so a
    crashed extraction never leaves a half dataset that looks complete.

    Args:
      path: output directory; must not exist.
      kind: 'moments' (mean and std/logvar concatenated over channels) or 'samples'.
      layout: 'NCHW' (PyTorch) or 'NHWC' for the arrays passed to `write`.
      moments_std: 'std' (REPA/EDM2: `cat([mean, std])`) or 'logvar' (diffusers'
        `DiagonalGaussianDistribution.parameters`: `cat([mean, logvar])`), converted to std here.
      dtype: on-disk float dtype; 'float16' halves the size.
      already_scaled: samples were multiplied by the VAE scale before writing (fast-DiT does).
    """

    def __init__(
        self,
        path: str,
        *,
        kind: str = "moments",
        layout: str = "NCHW",
        moments_std: str = "std",
        dtype: str = "float32",
        already_scaled: bool = False,
    ):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if layout not in ("NCHW", "NHWC"):
            raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
        if moments_std not in ("std", "logvar"):
            raise ValueError(f"moments_std must be 'std' or 'logvar', got {moments_std!r}")
        if already_scaled and kind == "moments":
            raise ValueError("already_scaled applies to samples; moments are raw VAE outputs")
        self._path = os.path.abspath(path)
        if os.path.exists(self._path):
            raise FileExistsError(f"latent dataset {self._path} already exists")
        self._kind, self._layout, self._moments_std = kind, layout, moments_std
        self._dtype = np.dtype(dtype).newbyteorder("<")
        self._already_scaled = already_scaled
        self._shape: tuple[int, int, int] | None = None
        self._count = 0
        self._max_label = -1
        parent = os.path.dirname(self._path)
        os.makedirs(parent, exist_ok=True)
        self._tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self._path)}.", dir=parent)
        self._writer = ArrayRecordWriter(os.path.join(self._tmp, RECORDS_FILE), "group_size:1")

    def write(self, latents: np.ndarray, labels: np.ndarray) -> None:
        """Append a batch: latents [n, ...] in the writer's layout, integer labels [n]."""
        latents = np.asarray(latents, np.float32)
        labels = np.asarray(labels)
        if latents.ndim != 4 or labels.shape != latents.shape[:1]:
            raise ValueError(
                f"expected latents [n, ...] with 4 dims and labels [n]; got {latents.shape} "
                f"and {labels.shape}"
            )
        if not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any():
            raise ValueError("labels must be non-negative integers")
        if self._layout == "NCHW":
            latents = latents.transpose(0, 2, 3, 1)
        if self._kind == "moments":
            if latents.shape[-1] % 2:
                raise ValueError(f"moments need an even channel count, got {latents.shape[-1]}")
            if self._moments_std == "logvar":
                mean, logvar = np.split(latents, 2, axis=-1)
                latents = np.concatenate([mean, np.exp(0.5 * np.clip(logvar, -30.0, 20.0))], -1)
        shape = tuple(latents.shape[1:])
        if self._shape is None:
            self._shape = shape
        elif shape != self._shape:
            raise ValueError(f"latent shape {shape} differs from earlier batches' {self._shape}")
        stored = np.ascontiguousarray(latents.astype(self._dtype))
        for x, y in zip(stored, labels):
            self._writer.write(np.asarray(y, _LABEL).tobytes() + x.tobytes())
        self._count += len(labels)
        self._max_label = max(self._max_label, int(labels.max(initial=-1)))

    def close(self, num_classes: int | None = None) -> LatentMeta:
        """Finish and publish the dataset; num_classes defaults to max label + 1."""
        self._writer.close()
        if self._shape is None:
            self.abort()
            raise ValueError("no latents were written")
        num_classes = self._max_label + 1 if num_classes is None else num_classes
        if num_classes <= self._max_label:
            self.abort()
            raise ValueError(f"num_classes={num_classes} but a label is {self._max_label}")
        meta = LatentMeta(
            kind=self._kind,
            stored_shape_hwc=self._shape,
            dtype=self._dtype.name,
            num_examples=self._count,
            num_classes=num_classes,
            already_scaled=self._already_scaled,
        )
        with open(os.path.join(self._tmp, META_FILE), "w") as f:
            json.dump({"format": FORMAT, "version": FORMAT_VERSION, **dataclasses.asdict(meta)}, f)
        os.chmod(self._tmp, 0o755)  # mkdtemp's 0700 would hide the dataset from other users
        os.rename(self._tmp, self._path)
        return meta

    def abort(self) -> None:
        """Drop everything written so far."""
        self._writer.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> LatentWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_latents(
    path: str, latents: np.ndarray, labels: np.ndarray, *, num_classes: int | None = None, **kwargs
) -> LatentMeta:
    """Write an in-memory latent dataset in one call; kwargs as for `LatentWriter`."""
    writer = LatentWriter(path, **kwargs)
    try:
        writer.write(latents, labels)
    except BaseException:
        writer.abort()
        raise
    return writer.close(num_classes)


def read_latent_meta(path: str) -> LatentMeta:
    """The dataset's metadata; DatasetMissingError naming the fix when there is none."""
    meta_path = os.path.join(path, META_FILE)
    if not path or not os.path.isfile(meta_path):
        raise DatasetMissingError(
            f"latent dataset not found at {path!r} (no {META_FILE}): write one with "
            "ditjax.data.latents.write_latents / LatentWriter and set config.data.latent_path"
        )
    with open(meta_path) as f:
        raw = json.load(f)
    if raw.pop("format", None) != FORMAT or raw.pop("version", None) != FORMAT_VERSION:
        raise ValueError(f"{meta_path} is not a {FORMAT} v{FORMAT_VERSION} metadata file")
    raw["stored_shape_hwc"] = tuple(raw["stored_shape_hwc"])
    return LatentMeta(**raw)


def open_latent_source(path: str) -> grain.sources.ArrayRecordDataSource:
    """Random-access raw records of a latent dataset (decode with `decode_record`)."""
    read_latent_meta(path)
    return grain.sources.ArrayRecordDataSource([os.path.join(path, RECORDS_FILE)])


def decode_record(record: bytes, meta: LatentMeta) -> dict[str, Any]:
    """Raw record -> {'latent': stored array HWC, 'label': int}."""
    array = np.frombuffer(record, np.dtype(meta.dtype).newbyteorder("<"), offset=_LABEL.itemsize)
    label = int(np.frombuffer(record, _LABEL, count=1)[0])
    return {"latent": array.reshape(meta.stored_shape_hwc), "label": label}


def sample_latent(
    stored: np.ndarray, meta: LatentMeta, scale: float, rng: np.random.Generator
) -> np.ndarray:
    """Model input, float32 HWC: z = mean + std * eps for moments, scaled like the references."""
    stored = stored.astype(np.float32)
    if meta.kind == "moments":
        mean, std = np.split(stored, 2, axis=-1)
        z = mean + std * rng.standard_normal(mean.shape, dtype=np.float32)
    else:
        z = stored
    return z if meta.already_scaled else z * np.float32(scale)
