"""Latent datasets: writer/reader roundtrip, posterior sampling, scaling, atomic writes."""
import os

import numpy as np
import pytest

from ditjax.data import default_data_config
from ditjax.data.errors import DatasetMissingError
from ditjax.data.latents import (
    LatentWriter,
    decode_record,
    open_latent_source,
    read_latent_meta,
    write_latents,
)
from ditjax.data.pipeline import dataset_info, make_train_iterator

SCALE = 0.18215


def _cfg(path, **overrides):
    cfg = default_data_config()
    cfg.name = "latents"
    cfg.latent_path = str(path)
    cfg.num_threads = 0
    cfg.update(overrides)
    return cfg


def _records(path):
    meta = read_latent_meta(str(path))
    source = open_latent_source(str(path))
    return meta, [decode_record(source[i], meta) for i in range(len(source))]


def test_moments_roundtrip_and_posterior_sampling_statistics(tmp_path):
    rng = np.random.default_rng(0)
    n, h, w = 1000, 2, 3  # not tiny: grain's index shuffle is slow below ~1000 records
    mean = rng.normal(size=(n, 4, h, w)).astype(np.float32)
    std = rng.uniform(0.2, 2.0, size=(n, 4, h, w)).astype(np.float32)
    path = tmp_path / "moments"
    write_latents(str(path), np.concatenate([mean, std], axis=1), np.arange(n), num_classes=1001)

    meta, records = _records(path)
    assert meta.kind == "moments" and meta.stored_shape_hwc == (h, w, 8)
    assert dataset_info(_cfg(path)) == ((h, w, 4), 1001, n)
    for r in records[:50]:  # stored NHWC; the label identifies the example
        np.testing.assert_array_equal(r["latent"][..., :4], mean[r["label"]].transpose(1, 2, 0))
        np.testing.assert_array_equal(r["latent"][..., 4:], std[r["label"]].transpose(1, 2, 0))

    it = make_train_iterator(_cfg(path), global_batch_size=250, seed=0)
    eps = np.zeros((2, n, h, w, 4), np.float32)
    for step in range(8):  # two epochs: every example twice
        batch = next(it)
        assert batch["image"].shape == (250, h, w, 4) and batch["image"].dtype == np.float32
        y = batch["label"]
        m, s = mean[y].transpose(0, 2, 3, 1), std[y].transpose(0, 2, 3, 1)
        eps[step // 4, y] = (batch["image"] / SCALE - m) / s  # z = (mean + std * eps) * scale
    assert abs(eps.mean()) < 0.02 and abs(eps.std() - 1.0) < 0.02
    assert abs(np.corrcoef(eps[0].ravel(), eps[1].ravel())[0, 1]) < 0.05  # fresh noise per epoch


def test_samples_are_scaled_unless_already_scaled(tmp_path):
    x = np.random.default_rng(1).normal(size=(3, 5, 6, 4)).astype(np.float32)  # NHWC
    for already_scaled, factor in [(False, np.float32(SCALE)), (True, np.float32(1.0))]:
        path = tmp_path / f"samples_{already_scaled}"
        write_latents(str(path), x, np.array([2, 0, 1]), kind="samples", layout="NHWC",
                      already_scaled=already_scaled)
        batch = next(make_train_iterator(_cfg(path), global_batch_size=3, seed=0))
        got = batch["image"][np.argsort(batch["label"])]
        np.testing.assert_array_equal(got, x[[1, 2, 0]] * factor)


def test_nchw_logvar_and_float16_are_converted_at_write_time(tmp_path):
    rng = np.random.default_rng(2)
    mean, logvar = rng.normal(size=(2, 2, 4, 3, 5)).astype(np.float32)
    write_latents(str(tmp_path / "lv"), np.concatenate([mean, logvar], 1), np.array([0, 1]),
                  moments_std="logvar", dtype="float16")
    meta, records = _records(tmp_path / "lv")
    assert meta.dtype == "float16" and meta.stored_shape_hwc == (3, 5, 8)
    for r in records:
        i = r["label"]
        expected = np.concatenate([mean[i], np.exp(0.5 * logvar[i])]).transpose(1, 2, 0)
        np.testing.assert_array_equal(r["latent"], expected.astype(np.float16))


def test_writer_is_atomic_and_refuses_to_overwrite(tmp_path):
    path = tmp_path / "crashed"
    with pytest.raises(RuntimeError):
        with LatentWriter(str(path), kind="samples") as w:
            w.write(np.zeros((2, 4, 2, 2)), np.array([0, 1]))
            raise RuntimeError("extraction died")
    assert os.listdir(tmp_path) == []  # neither the dataset nor its temporary directory
    write_latents(str(path), np.zeros((1, 4, 2, 2)), np.array([0]), kind="samples")
    with pytest.raises(FileExistsError):
        LatentWriter(str(path))
    with pytest.raises(ValueError, match="even channel count"):
        write_latents(str(tmp_path / "odd"), np.zeros((1, 3, 2, 2)), np.array([0]))
    assert sorted(os.listdir(tmp_path)) == ["crashed"]


def test_missing_latent_dataset_names_the_fix(tmp_path):
    with pytest.raises(DatasetMissingError, match="write_latents.*latent_path"):
        dataset_info(_cfg(tmp_path / "nowhere"))
