"""ADM centre crop and [-1, 1] scaling against an independent transcription of DiT's code."""
import io

import numpy as np
import pytest
from PIL import Image

from ditjax.data.preprocess import center_crop_arr, decode_image, to_model_range


def reference_center_crop_arr(pil_image, image_size):
    """DiT's train.py `center_crop_arr` (from ADM), transcribed independently."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC
    )
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size])


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("hw", [(45, 70), (70, 45), (33, 17)])
def test_center_crop_matches_reference_on_non_square_images(hw):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    expected = np.asarray(reference_center_crop_arr(Image.fromarray(arr), 16))
    got = decode_image(_png(arr), channels=3, image_size=16)
    assert got.shape == (16, 16, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(np.asarray(center_crop_arr(Image.fromarray(arr), 16)), expected)


def test_box_halving_changes_the_result():
    """Guards the test above: skipping ADM's BOX pre-downsampling is detectably different."""
    arr = np.random.default_rng(1).integers(0, 256, (45, 70, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    bicubic_only = img.resize((round(70 * 16 / 45), 16), resample=Image.BICUBIC)
    direct = np.asarray(bicubic_only)[:, (bicubic_only.size[0] - 16) // 2 :][:, :16]
    assert not np.array_equal(np.asarray(center_crop_arr(img, 16)), direct)


def test_grayscale_and_already_sized_images_pass_through_unchanged():
    arr = np.random.default_rng(2).integers(0, 256, (32, 32), dtype=np.uint8)
    gray = decode_image(_png(arr), channels=1, image_size=32)
    np.testing.assert_array_equal(gray, arr[..., None])
    rgb = decode_image(_png(arr), channels=3, image_size=32)  # greyscale source, RGB dataset
    np.testing.assert_array_equal(rgb, np.repeat(arr[..., None], 3, axis=-1))


def test_to_model_range_matches_totensor_normalize_and_flips():
    image = np.array([[[0], [255]], [[128], [64]]], dtype=np.uint8)
    expected = (image.astype(np.float32) / 255.0 - 0.5) / 0.5  # ToTensor + Normalize(0.5, 0.5)
    got = to_model_range(image, flip=False)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose(to_model_range(image, flip=True), expected[:, ::-1], atol=1e-6)
