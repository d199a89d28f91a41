"""Fixtures shared across test files: one digit classifier per test run, cached where the CLIs find it."""
from __future__ import annotations

import fcntl
import os
import time

import pytest

from ditjax.eval import digits


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory):
    """One cache per test run, shared by all pytest-xdist workers (same run id, common base temp dir)."""
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run_id is None:
        return tmp_path_factory.mktemp("ditjax_cache")
    shared = tmp_path_factory.getbasetemp().parent / f"ditjax_cache_{run_id}"
    shared.mkdir(exist_ok=True)
    return shared


@pytest.fixture(scope="session")
def classifier(cache_root):
    """The default evaluator classifier (DEFAULT_EPOCHS), so CLIs run with DITJAX_CACHE_DIR=cache_root load it.

    Trained by whichever worker takes the lock first; the others load it from the cache: one fit per run.
    """
    start = time.perf_counter()
    with open(cache_root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        clf = digits.load_digit_classifier(cache_root)
    print(f"\ndigit classifier ({digits.DEFAULT_EPOCHS} epochs) ready in {time.perf_counter() - start:.1f}s, "
          f"held-out accuracy {clf.heldout_accuracy:.4f}, FD real halves {clf.frechet_distance_real_halves:.2f}")
    return clf
