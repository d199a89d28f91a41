"""Digit evaluator: Fréchet distance maths, the cached classifier, and the metrics on real and noise images."""
from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
import scipy.linalg

from ditjax.eval import digits
from ditjax.eval.frechet import frechet_distance, frechet_distance_from_stats

# The default recipe, trained once per test run by the `classifier` fixture (tests/conftest.py).
EPOCHS = digits.DEFAULT_EPOCHS


# ----------------------------------------------------------------------------- Fréchet distance


def test_frechet_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    var1, var2 = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    got = frechet_distance_from_stats(mu1, np.diag(var1), mu2, np.diag(var2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_matches_sqrtm_for_full_covariances():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 32, 32))
    cov1, cov2 = a @ a.T / 32, b @ b.T / 32
    mu1, mu2 = rng.normal(size=(2, 32))
    expected = (
        np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2)
        - 2 * np.trace(scipy.linalg.sqrtm(cov1 @ cov2)).real
    )
    assert frechet_distance_from_stats(mu1, cov1, mu2, cov2) == pytest.approx(expected, rel=1e-8)


def test_frechet_of_samples_converges_to_closed_form():
    rng = np.random.default_rng(2)
    std1, std2 = rng.uniform(0.5, 2.0, 8), rng.uniform(0.5, 2.0, 8)
    x = rng.normal(size=(200_000, 8)) * std1
    y = rng.normal(size=(200_000, 8)) * std2 + 1.0
    expected = 8 * 1.0 + np.sum((std1 - std2) ** 2)  # var1+var2-2*sqrt(var1*var2) = (std1-std2)^2
    assert frechet_distance(x, y) == pytest.approx(expected, rel=0.02)


def test_frechet_zero_symmetric_and_grows_with_mean_shift():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(500, 20)) @ rng.normal(size=(20, 20))
    y = rng.normal(size=(400, 20))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(x, y) == pytest.approx(frechet_distance(y, x), rel=1e-9)
    shifts = [0.5, 1.0, 2.0, 4.0]
    # Shifting a set leaves its covariance unchanged, so the distance is exactly ||shift||^2.
    dists = [frechet_distance(x, x + s) for s in shifts]
    assert dists == pytest.approx([20 * s**2 for s in shifts], rel=1e-8)
    assert np.all(np.diff([frechet_distance(x, y + s) for s in shifts]) > 0)


def test_frechet_handles_dead_features():
    """ReLU features are often constant zero, making covariances singular; the result must stay finite."""
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(2, 300, 10))
    x[:, :3] = 0.0
    y[:, :3] = 0.0
    fd = frechet_distance(x, y)
    assert np.isfinite(fd)
    assert fd == pytest.approx(frechet_distance(x[:, 3:], y[:, 3:]), rel=1e-6, abs=1e-9)


# ----------------------------------------------------------------------------- data


def test_load_real_digits_layout():
    images, labels = digits.load_real_digits()
    assert images.shape == (5000, 32, 32, 1) and images.dtype == np.float32
    assert labels.shape == (5000,) and labels.dtype == np.int32
    assert np.bincount(labels).tolist() == [500] * 10
    assert images.min() == -1.0 and images.max() == 1.0
    assert np.all(images[:, :2] == -1.0) and np.all(images[:, :, -2:] == -1.0)  # padding is background
    train, heldout = digits.heldout_split(labels)
    assert len(train) == 4000 and len(heldout) == 1000 and not set(train) & set(heldout)
    a, b = digits.real_halves(labels)
    assert len(a) == len(b) == 2500 and not set(a) & set(b)
    assert np.bincount(labels[a]).tolist() == [250] * 10


# ----------------------------------------------------------------------------- classifier


def test_classifier_heldout_accuracy(classifier):
    assert classifier.heldout_accuracy >= 0.97


def test_evaluate_real_heldout_digits(classifier):
    images, labels = digits.load_real_digits()
    _, heldout = digits.heldout_split(labels)
    metrics = digits.evaluate_digit_samples(images[heldout], labels[heldout], classifier=classifier)
    assert set(metrics) == {"class_accuracy", "frechet_distance", "frechet_distance_real_halves", "per_class_accuracy"}
    assert metrics["class_accuracy"] >= 0.97
    assert metrics["class_accuracy"] == pytest.approx(classifier.heldout_accuracy)
    assert sorted(metrics["per_class_accuracy"]) == list(range(10))
    assert min(metrics["per_class_accuracy"].values()) >= 0.85
    halves = metrics["frechet_distance_real_halves"]
    assert halves > 0 and halves == digits.frechet_distance_real_halves(classifier=classifier)
    assert metrics["frechet_distance"] < 3 * halves  # real digits sit at the noise floor
    assert metrics["class_accuracy"] == digits.class_accuracy(images[heldout], labels[heldout], classifier=classifier)


def test_wrong_labels_and_overshooting_samples(classifier):
    images, labels = digits.load_real_digits()
    _, heldout = digits.heldout_split(labels)
    x, y = images[heldout], labels[heldout]
    assert digits.class_accuracy(x, (y + 1) % 10, classifier=classifier) < 0.05
    # Samplers overshoot [-1, 1]; values beyond are clipped, so overshoot changes nothing here.
    overshoot = np.where(x > 0, 1.5, -1.7).astype(np.float32) * np.abs(x)
    clipped = np.clip(overshoot, -1, 1)
    assert digits.frechet_distance_to_real(overshoot, classifier=classifier) == pytest.approx(
        digits.frechet_distance_to_real(clipped, classifier=classifier), rel=1e-6)


def test_noise_scores_badly(classifier):
    rng = np.random.default_rng(0)
    noise = rng.uniform(-1, 1, size=(500, 32, 32, 1)).astype(np.float32)
    labels = np.repeat(np.arange(10), 50)
    metrics = digits.evaluate_digit_samples(noise, labels, classifier=classifier)
    assert metrics["class_accuracy"] <= 0.25
    assert metrics["frechet_distance"] > 20 * metrics["frechet_distance_real_halves"]


# ----------------------------------------------------------------------------- cache


def _forbid_training(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("classifier was retrained")

    monkeypatch.setattr(digits, "_build", fail)


def _cache_file(root):
    (path,) = (root / "digit_classifier").iterdir()  # exactly one file: no temporaries left behind
    return path


def test_cache_is_reused(classifier, cache_root, monkeypatch):
    _forbid_training(monkeypatch)
    start = time.perf_counter()
    loaded = digits.load_digit_classifier(cache_root, epochs=EPOCHS)
    assert time.perf_counter() - start < 10
    assert loaded.heldout_accuracy == classifier.heldout_accuracy
    assert loaded.frechet_distance_real_halves == classifier.frechet_distance_real_halves
    images, _ = digits.load_real_digits()
    np.testing.assert_allclose(loaded.features(images[:64]), classifier.features(images[:64]), rtol=1e-5, atol=1e-5)
    # $DITJAX_CACHE_DIR is the default root.
    monkeypatch.setenv("DITJAX_CACHE_DIR", str(cache_root))
    assert digits.load_digit_classifier(epochs=EPOCHS).heldout_accuracy == classifier.heldout_accuracy


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _tamper(path):
    """A well-formed .npz whose weights no longer match the stored checksum."""
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["param/head/bias"] = arrays["param/head/bias"] + 1.0
    np.savez(path, **arrays)


@pytest.mark.parametrize("corrupt", [_truncate, _tamper])
def test_corrupt_cache_is_rebuilt(classifier, cache_root, tmp_path, monkeypatch, corrupt):
    shutil.copytree(cache_root / "digit_classifier", tmp_path / "digit_classifier")
    corrupt(_cache_file(tmp_path))
    builds = []

    def fake_build(epochs):  # stands in for retraining, which this test need not repeat
        builds.append(epochs)
        return classifier

    monkeypatch.setattr(digits, "_build", fake_build)
    with pytest.warns(UserWarning, match="invalid"):
        rebuilt = digits.load_digit_classifier(tmp_path, epochs=EPOCHS)
    assert builds == [EPOCHS]
    assert rebuilt.heldout_accuracy == classifier.heldout_accuracy
    _forbid_training(monkeypatch)
    digits.load_digit_classifier(tmp_path, epochs=EPOCHS)  # the rewritten file is valid
