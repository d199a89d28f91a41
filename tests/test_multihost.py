"""Multi-host: two local processes × 4 CPU devices train with jax.distributed, one process resumes.

The two-process FSDP run must produce, step by step, the losses of the single-process 8-device FSDP run
in tests/sharding_worker.py. That holds only if each host read its own half of every global batch and
the halves were assembled in order into one sharded array (hosts reading the same rows would train on
a different batch). The resumed run on 4 devices of one process must continue that same loss curve.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from ditjax.parallel import multihost
from multidevice import LOSS_RTOL, REPO, TINY, check, device_env, free_port, run, sharding_results

RUN = {"mesh.data": 1, "mesh.fsdp": -1, "mesh.rules": "fsdp", "train.log_every": 1, "train.checkpoint_every": 10,
       "train.eval_at_end": False, "sample.steps": 2, "sample.grid_per_class": 1, "sample.grid_classes": 2}


def train_args(workdir, num_steps: int) -> list[str]:
    overrides = {**TINY, **RUN, "train.num_steps": num_steps}
    return ["-m", "ditjax.train", "--config", "configs/default.py", "--workdir", str(workdir),
            *(f"--config.{k}={v}" for k, v in overrides.items())]


def metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_train_and_one_process_resumes(tmp_path):
    workdir = tmp_path / "run"
    coordinator = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, *train_args(workdir, 10), "--coordinator_address", coordinator,
                               "--num_processes", "2", "--process_id", str(i)],
                              cwd=REPO, env=device_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outputs)):
        check(p, out, f"process {i}")
    assert "process 1 of 2, 4 local / 8 global devices" in outputs[1]

    # Only process 0 writes logs and samples: each logged step once, one TensorBoard file. (The trainer
    # does not log the first step of a run, which includes compilation.)
    steps = [m["step"] for m in metrics(workdir)]
    assert steps == sorted(set(steps)) and steps[-1] == 10 and len(steps) >= 8
    assert len(list((workdir / "tensorboard").iterdir())) == 1
    assert (workdir / "samples" / "final.png").exists() and (workdir / "checkpoints" / "10").is_dir()

    resumed = run(train_args(workdir, 12), num_devices=4, timeout=600)
    assert "resumed from step 10" in resumed
    rows = metrics(workdir)
    assert [m["step"] for m in rows[len(steps):]][-1] == 12 and all(m["step"] > 10 for m in rows[len(steps):])
    reference = sharding_results()["runs"]["fsdp"]["losses"]
    np.testing.assert_allclose([m["loss"] for m in rows], [reference[m["step"] - 1] for m in rows], rtol=LOSS_RTOL)


_MESH_PROBE = """
import sys, jax
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from configs.default import get_config
from ditjax.parallel.mesh import batch_sharding, make_mesh, resolve_rules
c = get_config()
c.mesh.update(data=1, fsdp=-1, dcn_data=2, rules="fsdp")
mesh = make_mesh(c.mesh)
print("rows", [[d.process_index for d in row] for row in mesh.devices.reshape(2, 4)])
batch_sharding(mesh, resolve_rules(c.mesh), 4)
c.mesh.update(fsdp=1, tensor=-1, dcn_data=1)
try:
    batch_sharding(make_mesh(c.mesh), resolve_rules(c.mesh), 4)
except ValueError as err:
    print("refused:", err)
"""


@pytest.mark.slow
def test_dcn_axis_spans_processes_and_batch_must_separate_hosts():
    coordinator = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, "-c", _MESH_PROBE, coordinator, str(i)], cwd=REPO, env=device_env(4),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    for i, p in enumerate(procs):
        out = p.communicate(timeout=300)[0]
        check(p, out, f"process {i}")
        assert "rows [[0, 0, 0, 0], [1, 1, 1, 1]]" in out  # dcn_data=2: one process per data row
        assert "refused: the batch is split" in out  # tensor=8 across both hosts: no rows of their own


def test_initialize_reads_flags_or_environment(monkeypatch):
    calls = []
    monkeypatch.setattr(multihost.jax.distributed, "initialize", lambda *a: calls.append(a))
    monkeypatch.setattr(multihost.jax, "process_index", lambda: 0)
    for key in multihost._CLUSTER_ENV + ("SLURM_NTASKS",):
        monkeypatch.delenv(key, raising=False)
    multihost.initialize()
    assert calls == []  # a plain single-process run
    multihost.initialize("127.0.0.1:1234", 2, 1)
    assert calls[-1] == ("127.0.0.1:1234", 2, 1)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    multihost.initialize()
    assert len(calls) == 1  # a one-task SLURM allocation is a single process
    monkeypatch.setenv("SLURM_NTASKS", "4")
    multihost.initialize()
    assert calls[-1] == ()  # jax reads the SLURM environment itself
    with pytest.raises(ValueError, match="num_processes"):
        multihost.initialize("127.0.0.1:1234")
