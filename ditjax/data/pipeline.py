"""The trainer's one entry point: config.data -> an endless, resumable, host-sharded batch iterator.

Order is defined once for the whole job, independent of how many hosts read it:
  stream[i] = preprocess(record[perm_e(i mod N)], rng(seed, i)),  e = i // N (a fresh permutation
  per epoch), and global batch k = stream[k*G : (k+1)*G] for global batch size G.
Host p of P reads the contiguous slice stream[k*G + p*L : k*G + (p+1)*L], L = G/P. So hosts are
disjoint, their concatenation in process order is exactly the single-host global batch, and the
per-example randomness (flip, latent noise) depends only on (seed, i). Batches run across epoch
boundaries; nothing is dropped.

The iterator is grain's: `get_state()` is {'next_index': k} (JSON-serialisable; k = batches
consumed, equal on every host), and `set_state()` on a fresh iterator for the same config, seed
and global batch size continues with exactly batch k, even with a different process count.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import grain
import ml_collections
import numpy as np

from ditjax.data import digits, latents
from ditjax.data.config import DATASET_KINDS
from ditjax.data.preprocess import decode_image, decode_records, to_model_range
from ditjax.data.tfds_source import image_dataset_meta, open_image_source

Batch = dict[str, np.ndarray]
_ExampleFn = Callable[[Any, np.random.Generator], Batch]


class DataInfo(NamedTuple):
    """What the trainer validates and sizes the model with, before any record is read."""

    image_shape: tuple[int, int, int]  # HWC of batch['image'] (latent shape for latents)
    num_classes: int
    num_examples: int


def _check_kind(data_cfg: ml_collections.ConfigDict) -> None:
    if data_cfg.name not in DATASET_KINDS:
        raise ValueError(f"config.data.name must be one of {DATASET_KINDS}, got {data_cfg.name!r}")
    if data_cfg.name == "tfds" and not data_cfg.tfds_name:
        raise ValueError("config.data.name='tfds' needs config.data.tfds_name, e.g. 'imagenet2012'")
    if data_cfg.name != "latents" and data_cfg.image_size <= 0:
        raise ValueError(f"config.data.image_size must be positive, got {data_cfg.image_size}")


def _tfds_name(data_cfg: ml_collections.ConfigDict) -> str:
    """The TFDS name to read; the bundled digits are written on first use (idempotent)."""
    if data_cfg.name == "digits":
        digits.prepare_digits(data_cfg.data_dir)
        return digits.NAME
    return data_cfg.tfds_name


def dataset_info(data_cfg: ml_collections.ConfigDict) -> DataInfo:
    """Output shape, class count and split size from metadata only (digits: prepared if absent).

    Raises DatasetMissingError, naming the directory and the command that fixes it, when the data
    is not on disk.
    """
    _check_kind(data_cfg)
    if data_cfg.name == "latents":
        meta = latents.read_latent_meta(data_cfg.latent_path)
        return DataInfo(meta.latent_shape_hwc, meta.num_classes, meta.num_examples)
    meta = image_dataset_meta(_tfds_name(data_cfg), data_cfg.split, data_cfg.data_dir)
    size = data_cfg.image_size
    return DataInfo((size, size, meta.channels), meta.num_classes, meta.num_examples)


def _source_and_example_fn(data_cfg: ml_collections.ConfigDict) -> tuple[Sequence, _ExampleFn]:
    """Random-access records and the per-record (record, rng) -> example transform."""
    random_flip = bool(data_cfg.random_flip)
    if data_cfg.name == "latents":
        meta = latents.read_latent_meta(data_cfg.latent_path)
        scale = float(data_cfg.latent_scale)

        def latent_example(record: bytes, rng: np.random.Generator) -> Batch:
            decoded = latents.decode_record(record, meta)
            z = latents.sample_latent(decoded["latent"], meta, scale, rng)
            if random_flip and rng.random() < 0.5:
                z = np.ascontiguousarray(z[:, ::-1])
            return {"image": z, "label": np.int32(decoded["label"])}

        return latents.open_latent_source(data_cfg.latent_path), latent_example

    name = _tfds_name(data_cfg)
    meta = image_dataset_meta(name, data_cfg.split, data_cfg.data_dir)
    size = data_cfg.image_size
    source = open_image_source(name, data_cfg.split, data_cfg.data_dir)
    if data_cfg.cache_decoded:
        source = DecodedImages(source, meta.channels, size)
        read_image = lambda record: record["image"]
    else:
        read_image = lambda record: decode_image(record["image"], meta.channels, size)

    def image_example(record: dict[str, Any], rng: np.random.Generator) -> Batch:
        flip = random_flip and rng.random() < 0.5
        return {"image": to_model_range(read_image(record), flip), "label": np.int32(record["label"])}

    return source, image_example


class DecodedImages(Sequence):
    """A whole split decoded once into host memory: records {'image': uint8 HWC, 'label': int}.

    For datasets far smaller than RAM (the bundled digits: 5 MB), where reading, parsing and PNG-decoding
    every example each epoch would cost more CPU than the model's step can spare. Same records, same
    preprocessing, same order as reading from disk.
    """

    def __init__(self, source: Sequence[dict[str, Any]], channels: int, image_size: int):
        self.images, self.labels = decode_records(source.__getitems__(range(len(source))), channels, image_size)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "label": self.labels[index]}


def make_train_iterator(
    data_cfg: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """Endless iterator of this host's batches {'image': f32 [L,H,W,C], 'label': i32 [L]}.

    process_index/process_count are explicit (pass jax.process_index()/jax.process_count()) so
    tests can simulate several hosts in one process.
    """
    _check_kind(data_cfg)
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"need 0 <= process_index ({process_index}) < process_count ({process_count})"
        )
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} must be a positive multiple of "
            f"process_count {process_count}"
        )
    local_batch = global_batch_size // process_count
    source, example_fn = _source_and_example_fn(data_cfg)
    # Two unrelated 32-bit seeds: grain folds the epoch into the shuffle seed by addition, so
    # using `seed` directly would make seed s, epoch 1 replay seed s+1, epoch 0.
    shuffle_seed, example_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
    ds = (
        grain.MapDataset.source(source)
        .shuffle(seed=shuffle_seed)
        .repeat(None)
        .random_map(example_fn, seed=example_seed)  # seeded by global stream position
        .batch(local_batch, drop_remainder=True)[process_index::process_count]
    )
    read_options = grain.ReadOptions(
        num_threads=int(data_cfg.num_threads), prefetch_buffer_size=int(data_cfg.prefetch_batches)
    )
    return iter(ds.to_iter_dataset(read_options))
