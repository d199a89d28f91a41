"""The trainer through its CLI: exact resume after SIGKILL, SIGTERM, corrupt checkpoints, bad configs."""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = [  # ~20k parameters: each run is dominated by start-up and one compile
    "--config.model.hidden_size=32", "--config.model.depth=2", "--config.model.num_heads=2",
    "--config.model.patch_size=8", "--config.train.global_batch_size=8", "--config.train.log_every=1",
    "--config.train.async_checkpoint=true", "--config.train.eval_at_end=false",
    "--config.sample.steps=2", "--config.sample.grid_per_class=1", "--config.sample.grid_classes=2",
    "--config.optim.warmup_steps=2",
]


def train_cmd(workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ditjax.train", "--config", str(ROOT / "configs/default.py"),
            "--workdir", str(workdir), *TINY, *extra]


def run(workdir: Path, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(workdir, *extra), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def final_params(workdir: Path, step: int) -> dict[str, np.ndarray]:
    """Every array of a saved train state (params, EMA, optimizer moments, step, RNG) by path."""
    import jax
    import orbax.checkpoint as ocp

    tree = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


@pytest.mark.slow
def test_sigkill_resume_is_bitwise_identical(tmp_path):
    steps = ["--config.train.num_steps=8", "--config.train.checkpoint_every=2"]
    reference = run(tmp_path / "reference", *steps)
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]
    # The CLI applied its CPU defaults (ditjax.runtime) before JAX started: oneDNN dots, malloc reuse.
    assert "onednn_custom_call=true" in reference.stdout and "allocator=glibc+reuse" in reference.stdout

    workdir = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(workdir, *steps), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    kill_after = int(np.random.default_rng().integers(3, 7))  # a random step, once a checkpoint is complete
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 600
    checkpoints = workdir / "checkpoints"
    while time.time() < deadline and proc.poll() is None:
        finalized = checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir())
        if finalized and metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (workdir / "checkpoints" / "8").exists(), "the run finished before it could be killed"

    resumed = run(workdir, *steps)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stdout + resumed.stderr
    want, got = final_params(tmp_path / "reference", 8), final_params(workdir, 8)
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero_then_corrupt_latest_falls_back(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(workdir, "--config.train.num_steps=500", "--config.train.checkpoint_every=3"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = workdir / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 4):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert "SIGTERM received" in out and steps, out[-3000:]
    latest = steps[-1]
    assert latest >= 4, steps  # saved at the step the signal arrived

    # Corrupt the newest checkpoint's array data: the resume must warn, move it aside and use the previous.
    for f in (workdir / "checkpoints" / str(latest) / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"\0garbage" * 4)
    resumed = run(workdir, "--config.train.num_steps=" + str(latest + 1), "--config.train.checkpoint_every=3")
    text = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, text[-3000:]
    assert f"checkpoint step {latest} could not be restored" in text, text[-3000:]
    assert "resumed from step " + str(steps[-2]) in text, text[-3000:]
    assert any((workdir / "checkpoints_corrupt").iterdir()), "the corrupt checkpoint must be kept, not deleted"


@pytest.mark.parametrize("override, needle", [
    ("--config.model.hiden_size=64", "hiden_size"),
    ("--config.optim.lr=-1.0", "optim.lr"),
    ("--config.train.global_batch_size=7", "train.global_batch_size"),
    ("--config.data.name=tfds", "not_prepared_here"),
])
def test_bad_config_fails_fast_naming_the_key(tmp_path, override, needle):
    extra = [override] + (["--config.data.tfds_name=not_prepared_here"] if "tfds" in override else [])
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}  # batch 7 over 2 devices
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(train_cmd(tmp_path / "bad", *extra), cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert proc.returncode != 0
    assert needle in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-2000:]
    # CPU time, not wall time: other jobs on a shared CI machine cannot inflate it. Imports are
    # single-threaded, so on a quiet machine the wall time is about this number.
    assert cpu_seconds < 5, f"used {cpu_seconds:.1f} CPU seconds before failing"
    assert not (tmp_path / "bad" / "checkpoints").exists()
