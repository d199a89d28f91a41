"""Open a prepared TFDS image dataset as a random-access source, or say exactly why it can't be.

TFDS's own `data_source` would try to download and prepare a missing dataset, which needs network
and TensorFlow; here a missing or TFRecord-only dataset is an immediate, actionable error instead.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import tensorflow_datasets as tfds

from ditjax.data.errors import DatasetMissingError


@dataclasses.dataclass(frozen=True)
class ImageDatasetMeta:
    """What the pipeline needs to know about a TFDS image dataset without reading a record."""

    channels: int
    num_classes: int
    num_examples: int


def resolve_data_dir(data_dir: str) -> str:
    """TFDS's own rule: the explicit dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    chosen = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    return os.path.abspath(os.path.expanduser(chosen))


def _prepare_hint(name: str, data_dir: str, version_dir: str = "") -> str:
    manual = (
        f" (first put the ImageNet tars in {data_dir}/downloads/manual)"
        if name.startswith("imagenet")
        else ""
    )
    version_dir = version_dir or f"{data_dir}/{name}/<version>"
    return (
        f"on a machine with TensorFlow, build it: `tfds build {name} --data_dir={data_dir} "
        f"--file_format=array_record`{manual}, or convert a TFRecord copy: `tfds convert_format "
        f"--dataset_version_dir={version_dir} --out_file_format=array_record`; "
        "config.data.data_dir (else $TFDS_DATA_DIR) selects the directory"
    )


def _builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    """A builder for `name`, failing with the fix when it is not prepared as array_record."""
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DatasetMissingError(
            f"TFDS dataset {name!r} is neither a known TFDS builder nor found in {data_dir}: "
            + _prepare_hint(name, data_dir)
        ) from e
    if not builder.is_prepared():
        raise DatasetMissingError(
            f"TFDS dataset {name!r} not found in {data_dir} as array_record: "
            + _prepare_hint(name, data_dir)
        )
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise DatasetMissingError(
            f"TFDS dataset {name!r} in {builder.data_dir} is stored as "
            f"{builder.info.file_format.value}, but random access needs array_record: "
            + _prepare_hint(name, data_dir, str(builder.data_dir))
        )
    return builder


def image_dataset_meta(name: str, split: str, data_dir: str) -> ImageDatasetMeta:
    """Channels, class count and split size from the dataset's metadata files alone."""
    builder = _builder(name, resolve_data_dir(data_dir))
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise ValueError(
            f"TFDS dataset {name!r} has features {list(features)}; the image pipeline needs "
            "'image' and 'label'"
        )
    try:
        num_examples = int(builder.info.splits[split].num_examples)
    except (KeyError, ValueError, AssertionError) as e:
        raise ValueError(
            f"split {split!r} is not valid for TFDS dataset {name!r} (splits: "
            f"{list(builder.info.splits)}): {e}"
        ) from e
    return ImageDatasetMeta(
        channels=int(features["image"].shape[-1]),
        num_classes=int(features["label"].num_classes),
        num_examples=num_examples,
    )


def open_image_source(name: str, split: str, data_dir: str) -> Sequence[dict[str, Any]]:
    """Random-access records {'image': encoded bytes, 'label': int}.

    Images stay encoded so the preprocessor decodes them with PIL, exactly as the PyTorch
    references do, whatever decoder (OpenCV or PIL) TFDS would otherwise pick.
    """
    builder = _builder(name, resolve_data_dir(data_dir))
    return builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
