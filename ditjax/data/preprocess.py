"""Per-example image preprocessing, matching the PyTorch DiT/ADM training transforms.

DiT trains on `center_crop_arr` (from ADM) -> RandomHorizontalFlip -> ToTensor -> Normalize(0.5,
0.5). Reproducing it with PIL, not a JAX/TF resize, keeps FID comparable with published numbers.
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

_PIL_MODE = {1: "L", 3: "RGB"}


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM's centre crop: BOX-halve while the short side >= 2*size, BICUBIC to size, crop centre.

    The halving steps are what ADM does to avoid bicubic aliasing on large images.
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(
            tuple(x // 2 for x in pil_image.size), resample=Image.Resampling.BOX
        )
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(x * scale) for x in pil_image.size), resample=Image.Resampling.BICUBIC
    )
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size])


def decode_image(encoded: bytes, channels: int, image_size: int) -> np.ndarray:
    """Encoded PNG/JPEG bytes -> uint8 HWC [size, size, channels], centre-cropped if needed.

    Converts the mode first (e.g. CMYK or greyscale JPEGs in ImageNet -> RGB), as the references'
    ImageFolder loader does; an image already at the target size skips the resize round trip.
    """
    if channels not in _PIL_MODE:
        raise ValueError(f"images must have 1 or 3 channels, got {channels}")
    pil_image = Image.open(io.BytesIO(encoded)).convert(_PIL_MODE[channels])
    if pil_image.size != (image_size, image_size):
        pil_image = center_crop_arr(pil_image, image_size)
    return np.asarray(pil_image, dtype=np.uint8).reshape(image_size, image_size, channels)


def decode_records(records: Sequence[dict[str, Any]], channels: int, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Records {'image': encoded bytes, 'label': int} -> uint8 NHWC images and int32 labels, in order."""
    images = np.empty((len(records), image_size, image_size, channels), np.uint8)
    for i, record in enumerate(records):
        images[i] = decode_image(record["image"], channels, image_size)
    return images, np.array([r["label"] for r in records], np.int32)


def to_model_range(image: np.ndarray, flip: bool) -> np.ndarray:
    """uint8 HWC -> float32 HWC in [-1, 1], optionally mirrored left-right."""
    if flip:
        image = image[:, ::-1]
    return image.astype(np.float32) / 127.5 - 1.0
