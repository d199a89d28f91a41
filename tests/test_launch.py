"""Launchers: local sweeps with a fake trainer, dry-runs of every backend, the report."""
import csv
import json
import math
import os
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from launch import common, gke_xpk, slurm, sweep, tpu_pod

REPO = Path(__file__).resolve().parents[1]

CONFIG = """\
import ml_collections
from ditjax import sweep as hyper

def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict({"hidden_size": 64, "parametrization": "sp", "use_bias": True})
    c.optim = ml_collections.ConfigDict({"lr": 1e-3})
    c.fake = ml_collections.ConfigDict({"fail": False, "sleep": 0.0})
    return c

def get_sweep(arg=None):
    if arg == "fail":
        return hyper.zipit(hyper.sweep("fake.fail", [False, True, False]),  # the 2nd point fails
                           hyper.sweep("model.hidden_size", [64, 128, 256]))
    if arg == "hang":
        return hyper.product(hyper.sweep("model.hidden_size", [64, 128, 256]), hyper.fixed("fake.sleep", 60.0))
    if arg == "slow":
        return hyper.product(hyper.sweep("model.hidden_size", [64, 128, 256, 512]), hyper.fixed("fake.sleep", 0.5))
    return hyper.product(hyper.sweep("model.hidden_size", [64, 128]), hyper.sweep("optim.lr", [2**-10, 2**-9]))
"""

# Stands in for `python -m ditjax.train`: same flags, and the final_metrics.json contract.
FAKE_TRAIN = """\
import json, os, sys, time
args = sys.argv[1:]
workdir = args[args.index("--workdir") + 1]
over = dict(a[len("--config."):].split("=", 1) for a in args if a.startswith("--config."))
with open(os.path.join(workdir, "pid"), "w") as f:
    f.write(str(os.getpid()))
start = time.time()
time.sleep(float(over.get("fake.sleep", 0)))
if over.get("fake.fail") == "true":
    sys.exit(3)
metrics = {"final_loss": float(over.get("optim.lr", 1)), "start": start, "end": time.time(),
           "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "argv": args}
with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
    json.dump(metrics, f)
"""


@pytest.fixture
def env(tmp_path):
    (tmp_path / "cfg.py").write_text(CONFIG)
    (tmp_path / "fake_train.py").write_text(FAKE_TRAIN)
    return tmp_path


def _sweep(env, *args, config_arg=""):
    cfg = str(env / "cfg.py") + (f":{config_arg}" if config_arg else "")
    return sweep.main(["--config", cfg, "--sweep-dir", str(env / "sw"),
                       "--train-cmd", f"{sys.executable} {env / 'fake_train.py'}", *args])


def _metrics(env):
    return {p.parent.name: json.loads(p.read_text()) for p in (env / "sw").glob("*/final_metrics.json")}


# ----------------------------------------------------------------------------- local backend


def test_local_sweep_records_points_and_relaunch_skips_finished(env, capsys):
    assert _sweep(env, "--", "--config.model.use_bias=false") == 0
    first = _metrics(env)
    assert len(first) == 4
    name = "hidden_size=128_lr=0.000977_" + sweep.hyper.point_hash({"model.hidden_size": 128, "optim.lr": 2**-10})
    record = json.loads((env / "sw" / name / "sweep_point.json").read_text())
    assert record["overrides"] == {"model.hidden_size": 128, "optim.lr": 2**-10}
    assert record["commands"][0].endswith(
        f"--workdir {env / 'sw' / name} --config.model.hidden_size=128 --config.optim.lr=0.0009765625 "
        "--config.model.use_bias=false")
    assert first[name]["argv"] == shlex.split(record["commands"][0])[2:]
    assert (env / "sw" / name / "stdout.log").read_text().startswith("$ ")

    (env / "sw" / name / "final_metrics.json").unlink()
    capsys.readouterr()
    assert _sweep(env) == 0
    out = capsys.readouterr().out
    assert "4 points, 3 finished (skipped), 1 to run" in out and f"done {name}" in out
    again = _metrics(env)
    assert all(again[n] == first[n] for n in first if n != name)  # finished points untouched


def test_failed_point_is_reported_and_the_others_finish(env, capsys):
    assert _sweep(env, config_arg="fail") == 1
    out = capsys.readouterr().out
    bad = sweep.hyper.point_name({"fake.fail": True, "model.hidden_size": 128})
    assert f"FAILED {bad} (exit 3)" in out and "2 of 3 points finished, 1 failed" in out
    assert len(_metrics(env)) == 2
    assert _sweep(env, config_arg="fail") == 1  # re-launch retries only the failed point
    assert "3 points, 2 finished (skipped), 1 to run" in capsys.readouterr().out


def test_parallel_runs_overlap_and_gpus_are_never_shared(env):
    assert _sweep(env, "--parallel", "2", "--gpus", "0,1,2,3", config_arg="slow") == 0
    runs = sorted(_metrics(env).values(), key=lambda m: m["start"])
    assert len(runs) == 4 and {r["cuda"] for r in runs} == {"0,1", "2,3"}
    overlapping = [(a, b) for i, a in enumerate(runs) for b in runs[i + 1:] if b["start"] < a["end"]]
    assert overlapping  # two ran at once ...
    assert all(a["cuda"] != b["cuda"] for a, b in overlapping)  # ... on different GPUs


def test_sigterm_to_the_launcher_ends_its_running_points(env):
    launcher = subprocess.Popen(
        [sys.executable, "launch/sweep.py", "--config", f"{env / 'cfg.py'}:hang", "--sweep-dir", str(env / "sw"),
         "--parallel", "2", "--train-cmd", f"{sys.executable} {env / 'fake_train.py'}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while len(pid_files := list((env / "sw").glob("*/pid"))) < 2 and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.2)  # let both fakes finish writing their pid
    launcher.terminate()
    assert launcher.wait(timeout=30) == 130 and "interrupted" in launcher.stdout.read()
    assert len(list((env / "sw").glob("*/pid"))) == 2  # the third point never started
    for pid in (int(p.read_text()) for p in pid_files):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_local_dry_run_prints_and_writes_nothing(env, capsys):
    assert _sweep(env, "--dry-run") == 0
    out = capsys.readouterr().out
    assert out.count("fake_train.py --config") == 4 and "--config.optim.lr=0.001953125" in out
    assert not (env / "sw").exists()


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # inside ml_collections
def test_overrides_parse_back_exactly_through_config_flags(env):
    """What the launcher writes is what ml_collections' config_flags reads."""
    overrides = {"optim.lr": 2**-10 / 3, "model.use_bias": False, "model.parametrization": "mup",
                 "model.hidden_size": 96}
    argv = common.train_argv(str(env / "cfg.py"), "w", overrides, train_cmd="prog")
    argv = argv[:3] + argv[5:]  # without --workdir, a flag of ditjax.train rather than config_flags
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv)
    fv(argv)
    assert fv.config.optim.lr == 2**-10 / 3 and fv.config.model.use_bias is False
    assert fv.config.model.parametrization == "mup" and fv.config.model.hidden_size == 96


# ----------------------------------------------------------------------------- slurm backend

SLURM_ARGS = ["--backend", "slurm", "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu",
              "--time", "02:00:00", "--setup", "source .venv/bin/activate"]


def test_slurm_sweep_dry_run_prints_one_job_script_per_point(env, capsys):
    assert _sweep(env, *SLURM_ARGS, "--dry-run", "--train-cmd", "python -m ditjax.train") == 0
    out = capsys.readouterr().out
    assert out.count("#!/bin/bash") == 4 and out.count("\nsbatch ") == 4
    for needle in ["#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --partition=gpu",
                   "#SBATCH --ntasks-per-node=1", 'scontrol show hostnames "$SLURM_JOB_NODELIST"',
                   '--coordinator_address "$COORDINATOR_ADDRESS"', '--process_id "$SLURM_PROCID"',
                   "srun --ntasks-per-node=1", f"python -m ditjax.train --config {env / 'cfg.py'}",
                   "--config.model.hidden_size=128",
                   "--config.optim.lr=0.0009765625", "source .venv/bin/activate"]:
        assert needle in out, needle
    assert not (env / "sw").exists()


def _fake_bin(tmp_path, **scripts):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + textwrap.dedent(body))
        (bin_dir / name).chmod(0o755)
    return bin_dir


def test_slurm_sweep_submits_each_point_once(env, capsys, monkeypatch):
    queued = sweep.hyper.point_name({"model.hidden_size": 64, "optim.lr": 2**-10})
    bin_dir = _fake_bin(env, sbatch=f'echo "$1" >> {env}/submitted; echo "Submitted batch job 7"\n',
                        squeue=f'echo "{queued}"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert _sweep(env, *SLURM_ARGS) == 0
    out = capsys.readouterr().out
    assert f"skip {queued}: already queued or running" in out and "3 of 3 points submitted" in out
    submitted = (env / "submitted").read_text().split()
    assert len(submitted) == 3 and all(s.endswith("/job.sbatch") and os.path.exists(s) for s in submitted)


def test_slurm_script_gives_every_task_the_coordinator(tmp_path):
    """Runs the generated script under bash with fake scontrol/srun: checks the quoting, not just text."""
    recorder = tmp_path / "record.py"
    recorder.write_text("import json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    bin_dir = _fake_bin(tmp_path, scontrol='printf "node-a\\nnode-b\\n"\n', srun="""\
        while [[ "$1" == --* ]]; do shift; done
        for i in $(seq 0 $((SLURM_NTASKS - 1))); do SLURM_PROCID=$i "$@" || exit $?; done
        """)
    job = slurm.SlurmJob(nodes=2, gpus_per_node=8, partition="p", time="1:00:00")
    train = common.train_argv("configs/x.py:a=1,b", "/runs/it's here", {"optim.lr": 0.5},
                              train_cmd=f"{sys.executable} {recorder}")
    script = tmp_path / "job.sbatch"
    script.write_text(slurm.render_script(job, train, "j", "log"))
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node-[a-b]",
           "SLURM_JOB_ID": "123", "SLURM_NTASKS": "2"}
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, check=True).stdout
    tasks = [json.loads(line) for line in out.splitlines()]
    base = ["--config", "configs/x.py:a=1,b", "--workdir", "/runs/it's here", "--config.optim.lr=0.5"]
    assert tasks == [base + ["--coordinator_address", "node-a:20123", "--num_processes", "2",
                             "--process_id", str(i)] for i in range(2)]


# ----------------------------------------------------------------------------- tpu backend

TPU_ARGS = ["--backend", "tpu", "--tpu", "pod", "--zone", "us-east5-a", "--project", "proj",
            "--remote-dir", "gs://bkt/sweep/"]


def test_tpu_sweep_dry_run_prints_setup_once_then_gcloud_per_point(env, capsys):
    name = sweep.hyper.point_name({"model.hidden_size": 64, "optim.lr": 2**-9})
    (env / "sw" / name).mkdir(parents=True)
    (env / "sw" / name / "final_metrics.json").write_text("{}")
    assert _sweep(env, *TPU_ARGS, "--dry-run", "--train-cmd", ".venv/bin/python -m ditjax.train") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("4 points, 1 finished (skipped), 3 to run on tpu")
    assert sum("tpu-vm scp" in line for line in lines) == 1 and sum("pip install" in line for line in lines) == 1
    trains = [line for line in lines if "ditjax.train" in line]
    assert len(trains) == 3 and all(t.startswith("gcloud compute tpus tpu-vm ssh pod '--command=cd ditjax && ")
                                    and t.endswith("--zone=us-east5-a --project=proj --worker=all") for t in trains)
    point = sweep.hyper.point_name({"model.hidden_size": 128, "optim.lr": 2**-10})
    assert (f"--config {env / 'cfg.py'} --workdir gs://bkt/sweep/{point} --config.model.hidden_size=128 "
            "--config.optim.lr=0.0009765625'") in trains[1]
    assert f"gcloud storage cp gs://bkt/sweep/{point}/final_metrics.json {env / 'sw' / point / 'final_metrics.json'}" \
        in lines


def test_tpu_sweep_needs_remote_dir_and_one_point_at_a_time(env):
    with pytest.raises(SystemExit):
        _sweep(env, *TPU_ARGS[:-2], "--dry-run")
    with pytest.raises(SystemExit):
        _sweep(env, *TPU_ARGS, "--parallel", "2", "--dry-run")


# ----------------------------------------------------------------------------- single-run launchers


def test_tpu_pod_dry_run_exact_commands(capsys):
    assert tpu_pod.main(["--tpu", "my-v5p-64", "--zone", "us-east5-a", "--project", "proj", "--config",
                         "configs/default.py:b2", "--workdir", "gs://bkt/runs/a", "--dry-run", "--",
                         "--config.optim.lr=0.001"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "bash -c 'mkdir -p runs && git ls-files -z --cached --others --exclude-standard"
        " | tar -czf runs/ditjax-code.tgz --null -T -'",
        "gcloud compute tpus tpu-vm scp runs/ditjax-code.tgz my-v5p-64:ditjax.tgz --zone=us-east5-a"
        " --project=proj --worker=all",
        "gcloud compute tpus tpu-vm ssh my-v5p-64 '--command=mkdir -p ditjax && tar -xzf ditjax.tgz -C ditjax"
        " && cd ditjax && (test -x .venv/bin/python || python3 -m venv .venv)"
        " && .venv/bin/pip install -q -e . \"jax[tpu]\"' --zone=us-east5-a --project=proj --worker=all",
        "gcloud compute tpus tpu-vm ssh my-v5p-64 '--command=cd ditjax && .venv/bin/python -m ditjax.train"
        " --config configs/default.py:b2 --workdir gs://bkt/runs/a --config.optim.lr=0.001'"
        " --zone=us-east5-a --project=proj --worker=all",
    ]


def test_tpu_pod_no_sync_skips_the_copy(capsys):
    assert tpu_pod.main(["--tpu", "t", "--zone", "z", "--config", "c.py", "--workdir", "gs://b/w",
                         "--no-sync", "--remote-python", "python3.12", "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "gcloud compute tpus tpu-vm ssh t '--command=cd ditjax && (test -x .venv/bin/python"
        " || python3.12 -m venv .venv) && .venv/bin/pip install -q -e . \"jax[tpu]\"' --zone=z --worker=all",
        "gcloud compute tpus tpu-vm ssh t '--command=cd ditjax && .venv/bin/python -m ditjax.train"
        " --config c.py --workdir gs://b/w' --zone=z --worker=all",
    ]


def test_gke_xpk_dry_run_exact_commands(capsys):
    common_args = ["--cluster", "c1", "--config", "configs/default.py", "--workdir", "gs://b/r", "--dry-run"]
    assert gke_xpk.main(["--workload", "dit-xl2-a", "--tpu-type", "v5p-128", "--num-slices", "2",
                         "--docker-image", "gcr.io/p/ditjax:1", "--project", "p", "--zone", "us-east5-a",
                         "--max-restarts", "3", "--xpk-arg=--spot", *common_args, "--", "--config.seed=1"]) == 0
    assert gke_xpk.main(["--workload", "dit-gpu", "--device-type", "h100-80gb-8", "--num-nodes", "4",
                         "--base-docker-image", "nvcr.io/nvidia/jax:25.04-py3", "--priority", "high",
                         *common_args]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "xpk workload create --cluster=c1 --workload=dit-xl2-a --tpu-type=v5p-128 --num-slices=2"
        " --docker-image=gcr.io/p/ditjax:1 --project=p --zone=us-east5-a --max-restarts=3 --spot"
        " '--command=python3 -m ditjax.train --config configs/default.py --workdir gs://b/r --config.seed=1'",
        "xpk workload create --cluster=c1 --workload=dit-gpu --device-type=h100-80gb-8 --num-slices=1"
        " --num-nodes=4 --base-docker-image=nvcr.io/nvidia/jax:25.04-py3 --priority=high"
        " '--command=python3 -m ditjax.train --config configs/default.py --workdir gs://b/r'",
    ]
    with pytest.raises(SystemExit):  # xpk's name rule, checked before any image is built
        gke_xpk.main(["--workload", "Dit_A", "--tpu-type", "v5p-8", "--docker-image", "i", *common_args])


def test_slurm_dry_run_exact_script(capsys):
    assert slurm.main(["--nodes", "4", "--gpus-per-node", "8", "--partition", "a100", "--time", "1-00:00:00",
                       "--sbatch-opt=--account=proj", "--config", "configs/default.py", "--workdir", "/shared/r",
                       "--job-name", "dit", "--dry-run", "--", "--config.optim.lr=0.0001"]) == 0
    assert capsys.readouterr().out == textwrap.dedent("""\
        # /shared/r/job.sbatch
        #!/bin/bash
        #SBATCH --job-name=dit
        #SBATCH --nodes=4
        #SBATCH --ntasks-per-node=1
        #SBATCH --gpus-per-node=8
        #SBATCH --partition=a100
        #SBATCH --time=1-00:00:00
        #SBATCH --output=/shared/r/slurm-%j.out
        #SBATCH --account=proj
        # One process per node drives all of its GPUs; the first node coordinates.
        set -euo pipefail
        COORDINATOR_HOST="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"
        export COORDINATOR_ADDRESS="${COORDINATOR_HOST}:$((20000 + SLURM_JOB_ID % 20000))"
        {srun}
        sbatch /shared/r/job.sbatch
        """).replace("{srun}", (
        "srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c 'exec \"$@\" --coordinator_address"
        " \"$COORDINATOR_ADDRESS\" --num_processes \"$SLURM_NTASKS\" --process_id \"$SLURM_PROCID\"' train"
        " python -m ditjax.train --config configs/default.py --workdir /shared/r --config.optim.lr=0.0001"))
    with pytest.raises(SystemExit):
        slurm.main(["--partition", "p", "--time", "90 minutes", "--config", "c", "--workdir", "w", "--dry-run"])


# ----------------------------------------------------------------------------- report


def _synthetic_sweep(root):
    """μP transfer shape: SP's best lr shrinks with width, μP's stays at 2^-10; one SP run diverged."""
    for param in ["sp", "mup"]:
        for width in [64, 256]:
            for e in [-12, -11, -10, -9, -8]:
                best = -10 if param == "mup" else -10 - (width == 256) * 2
                overrides = {"model.parametrization": param, "model.hidden_size": width, "optim.lr": 2.0**e}
                d = root / sweep.hyper.point_name(overrides)
                d.mkdir(parents=True)
                (d / "sweep_point.json").write_text(json.dumps({"name": d.name, "overrides": overrides}))
                loss = math.nan if (param, width, e) == ("sp", 256, -8) else 1 + 0.1 * (e - best) ** 2 - width / 1000
                if (param, width, e) != ("mup", 64, -12):  # one point never finished
                    (d / "final_metrics.json").write_text(json.dumps({"final_loss": loss, "step": 100}))


def test_report_csv_png_and_best_table(tmp_path, capsys):
    _synthetic_sweep(tmp_path)
    assert sweep.main(["report", "--sweep-dir", str(tmp_path), "--group", "model.hidden_size",
                       "--panel", "model.parametrization"]) == 0  # --x defaults to optim.lr (most values)
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["name", "status", "model.hidden_size", "model.parametrization", "optim.lr",
                             "final_loss", "step"]
    assert len(rows) == 20 and sum(r["status"] == "unfinished" for r in rows) == 1
    diverged = next(r for r in rows if r["optim.lr"] == "0.00390625" and r["model.hidden_size"] == "256"
                    and r["model.parametrization"] == "sp")
    assert diverged["final_loss"] == "nan"
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = (tmp_path / "best.md").read_text()
    assert best == textwrap.dedent("""\
        | model.parametrization | model.hidden_size | best optim.lr | final_loss | finite/total |
        |---|---|---|---|---|
        | mup | 64 | 0.000976562 (2^-10) | 0.936 | 4/5 |
        | mup | 256 | 0.000976562 (2^-10) | 0.744 | 5/5 |
        | sp | 64 | 0.000976562 (2^-10) | 0.936 | 5/5 |
        | sp | 256 | 0.000244141 (2^-12) | 0.744 | 4/5 |
        """)
    assert best in capsys.readouterr().out


def test_best_table_maximize_and_no_group(tmp_path):
    rows = [{"name": str(i), "status": "finished", "optim.lr": lr, "acc": acc}
            for i, (lr, acc) in enumerate([(0.1, 0.5), (0.2, 0.9), (0.4, math.inf), (0.8, 0.7)])]
    assert sweep.best_table(rows, "optim.lr", "acc", maximize=True) == [
        {"best optim.lr": 0.2, "acc": 0.9, "finite/total": "3/4"}]
    sweep.plot(rows, "optim.lr", "acc", tmp_path / "p.png", maximize=True)
    assert (tmp_path / "p.png").stat().st_size > 0
