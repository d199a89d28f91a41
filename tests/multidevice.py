"""Helpers for tests on several simulated CPU devices or processes.

XLA reads its device count once per process, so multi-device code runs in subprocesses; the rest of
the suite keeps its single device. The tiny model below is shared by the in-process sharding worker
and the multi-host CLI run, so their losses can be compared step by step.
"""
from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Code-generation effort only: halves compile time, the same HLO runs (all runs in a test share it).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

# configs/default.py shrunk to seconds per compile, in float32 so that sharded and single-device losses
# differ only by reduction order. A constant schedule makes the loss at step k independent of
# train.num_steps, so a resumed run can be compared with an uninterrupted one.
TINY = {
    "model.hidden_size": 32, "model.depth": 2, "model.num_heads": 2, "model.dtype": "float32",
    "train.global_batch_size": 16, "optim.schedule": "constant",
}
# Float32 losses of sharded runs differ from one device only by reduction order (observed ≤ 1e-6).
LOSS_RTOL = 2e-5
STEPS = 20


def device_env(num_devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices} {FAST_COMPILE}",
               JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check(proc: subprocess.CompletedProcess | subprocess.Popen, output: str, what: str) -> None:
    if proc.returncode != 0:
        raise AssertionError(f"{what} exited with {proc.returncode}; last output:\n{output[-4000:]}")


def run(args: list[str], num_devices: int, timeout: float) -> str:
    """Run ``python ARGS`` from the repository root on ``num_devices`` CPU devices; return its output."""
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=device_env(num_devices), capture_output=True,
                          text=True, timeout=timeout)
    check(proc, proc.stdout + proc.stderr, " ".join(args))
    return proc.stdout + proc.stderr


@functools.cache
def sharding_results() -> dict:
    """The 8-device worker's report (losses per preset, specs, checkpoint reshards), computed once."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        run([str(REPO / "tests" / "sharding_worker.py"), str(out), tmp], num_devices=8, timeout=900)
        return json.loads(out.read_text())
