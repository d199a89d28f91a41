"""make_train_iterator / dataset_info: determinism, bitwise resume, host sharding, errors."""
import json
import time

import numpy as np
import pytest

from ditjax.data import default_data_config
from ditjax.data.digits import prepare_digits
from ditjax.data.errors import DatasetMissingError
from ditjax.data.latents import write_latents
from ditjax.data.pipeline import dataset_info, make_train_iterator

N_CODED = 1000  # grain's index shuffle is slow for tiny datasets


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    """The real dataset, shared by this session's test modules (preparing is idempotent)."""
    data_dir = str(tmp_path_factory.getbasetemp() / "tfds_digits")
    prepare_digits(data_dir)
    return data_dir


def _digits(data_dir, **overrides):
    cfg = default_data_config()
    cfg.data_dir = data_dir
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def coded_cfg(tmp_path_factory):
    """Latents: channel 0 is the record id, channel 1 the column, so order and flips show."""
    path = str(tmp_path_factory.mktemp("coded") / "latents")
    x = np.zeros((N_CODED, 2, 3, 2), np.float32)
    x[..., 0] = np.arange(N_CODED)[:, None, None]
    x[..., 1] = np.arange(3)
    write_latents(path, x, np.arange(N_CODED) % 10, kind="samples", layout="NHWC",
                  already_scaled=True)
    cfg = default_data_config()
    cfg.update(dict(name="latents", latent_path=path, random_flip=True))
    return cfg


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_digits_batches_spec_and_info(digits_dir):
    cfg = _digits(digits_dir)
    assert dataset_info(cfg) == ((32, 32, 1), 10, 5000)
    batch = next(make_train_iterator(cfg, global_batch_size=16, seed=0))
    assert batch["image"].shape == (16, 32, 32, 1) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
    assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0


def test_generic_tfds_path_with_centre_crop_and_split(digits_dir):
    cfg = _digits(digits_dir, name="tfds", tfds_name="ditjax_digits", split="classifier_test",
                  image_size=24)
    assert dataset_info(cfg) == ((24, 24, 1), 10, 1000)
    batch = next(make_train_iterator(cfg, global_batch_size=8, seed=0))
    assert batch["image"].shape == (8, 24, 24, 1)


def test_same_seed_same_batches_other_seed_different(digits_dir):
    cfg = _digits(digits_dir, random_flip=True)
    a = _take(make_train_iterator(cfg, global_batch_size=32, seed=7), 3)
    _assert_same(a, _take(make_train_iterator(cfg, global_batch_size=32, seed=7), 3))
    b = _take(make_train_iterator(cfg, global_batch_size=32, seed=8), 3)
    assert not np.array_equal(a[0]["label"], b[0]["label"])
    assert not np.array_equal(a[0]["image"], b[0]["image"])


def test_resume_from_saved_state_is_bitwise_identical(digits_dir):
    cfg = _digits(digits_dir, random_flip=True)
    it = make_train_iterator(cfg, global_batch_size=32, seed=3)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # must survive a JSON checkpoint
    expected = _take(it, 4)
    resumed = make_train_iterator(cfg, global_batch_size=32, seed=3)
    resumed.set_state(state)
    _assert_same(_take(resumed, 4), expected)


@pytest.mark.parametrize("name, extra", [("digits", {}), ("tfds", {"tfds_name": "ditjax_digits", "image_size": 24})])
def test_decoded_cache_serves_the_same_stream_and_resumes(digits_dir, name, extra):
    """The in-memory copy changes where records come from, not what they are (centre crop included)."""
    disk = _digits(digits_dir, name=name, random_flip=True, **extra)
    cached = _digits(digits_dir, name=name, random_flip=True, cache_decoded=True, **extra)
    it = make_train_iterator(cached, global_batch_size=32, seed=5)
    _assert_same(_take(it, 2), _take(make_train_iterator(disk, global_batch_size=32, seed=5), 2))
    resumed = make_train_iterator(cached, global_batch_size=32, seed=5)
    resumed.set_state(it.get_state())
    _assert_same(_take(resumed, 2), _take(it, 2))


def test_random_flip_mirrors_about_half_of_the_digits(digits_dir):
    plain = _take(make_train_iterator(_digits(digits_dir), global_batch_size=128, seed=1), 3)
    flipped = _take(
        make_train_iterator(_digits(digits_dir, random_flip=True), global_batch_size=128, seed=1), 3
    )
    n_mirrored = 0
    for p, f in zip(plain, flipped):
        np.testing.assert_array_equal(p["label"], f["label"])  # flips don't change the order
        for x, y in zip(p["image"], f["image"]):
            mirrored = np.array_equal(y, x[:, ::-1]) and not np.array_equal(y, x)
            assert mirrored or np.array_equal(y, x)
            n_mirrored += mirrored
    assert 0.4 < n_mirrored / 384 < 0.6


def test_each_epoch_is_a_fresh_permutation_and_batches_cross_epochs(coded_cfg):
    it = make_train_iterator(coded_cfg, global_batch_size=300, seed=0)  # 10 batches = 3 epochs
    ids = np.concatenate([b["image"][:, 0, 0, 0] for b in _take(it, 10)]).astype(int)
    epochs = ids.reshape(3, N_CODED)
    for epoch in epochs:
        assert sorted(epoch) == list(range(N_CODED))
    assert not np.array_equal(epochs[0], epochs[1])
    unthreaded_cfg = coded_cfg.copy_and_resolve_references()
    unthreaded_cfg.num_threads = 0  # reading without prefetch threads: the same stream
    unthreaded = _take(make_train_iterator(unthreaded_cfg, global_batch_size=300, seed=0), 10)
    np.testing.assert_array_equal(
        np.concatenate([b["image"][:, 0, 0, 0] for b in unthreaded]).astype(int), ids
    )
    mirrored = np.concatenate([b["image"][:, 0, 0, 1] != 0 for b in _take(it, 4)])
    assert 0.4 < mirrored.mean() < 0.6


@pytest.mark.parametrize("process_count", [2, 3])
def test_hosts_split_each_global_batch_in_process_order(coded_cfg, process_count):
    single = _take(make_train_iterator(coded_cfg, global_batch_size=12, seed=5), 6)
    hosts = [
        _take(make_train_iterator(coded_cfg, global_batch_size=12, seed=5,
                                  process_index=p, process_count=process_count), 6)
        for p in range(process_count)
    ]
    for step, whole in enumerate(single):
        parts = [host[step] for host in hosts]
        assert all(part["image"].shape[0] == 12 // process_count for part in parts)
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_resume_on_a_different_number_of_hosts(coded_cfg):
    it = make_train_iterator(coded_cfg, global_batch_size=12, seed=2)
    _take(it, 5)
    state, expected = it.get_state(), _take(it, 3)
    hosts = []
    for p in range(2):
        host = make_train_iterator(coded_cfg, global_batch_size=12, seed=2, process_index=p,
                                   process_count=2)
        host.set_state(state)
        hosts.append(_take(host, 3))
    for step in range(3):
        got = np.concatenate([hosts[0][step]["image"], hosts[1][step]["image"]])
        np.testing.assert_array_equal(got, expected[step]["image"])


def test_missing_tfds_dataset_fails_fast_with_the_fix(tmp_path):
    cfg = _digits(str(tmp_path / "empty"), name="tfds", tfds_name="cifar10")
    start = time.monotonic()
    for call in (lambda: dataset_info(cfg),
                 lambda: make_train_iterator(cfg, global_batch_size=8, seed=0)):
        with pytest.raises(DatasetMissingError) as err:
            call()
        message = str(err.value)
        assert "cifar10" in message and str(tmp_path / "empty") in message
        assert "array_record" in message and "tfds build" in message
    assert time.monotonic() - start < 5.0
    assert not (tmp_path / "empty").exists()  # nothing downloaded or prepared


def test_invalid_configs_are_rejected(digits_dir):
    with pytest.raises(ValueError, match="multiple of process_count"):
        make_train_iterator(_digits(digits_dir), global_batch_size=10, seed=0, process_count=4)
    with pytest.raises(ValueError, match="process_index"):
        make_train_iterator(_digits(digits_dir), global_batch_size=8, seed=0, process_index=2,
                            process_count=2)
    with pytest.raises(ValueError, match="must be one of"):
        dataset_info(_digits(digits_dir, name="imagenet"))
    with pytest.raises(ValueError, match="tfds_name"):
        dataset_info(_digits(digits_dir, name="tfds"))
    with pytest.raises(ValueError, match="split 'validation'"):
        dataset_info(_digits(digits_dir, split="validation"))
