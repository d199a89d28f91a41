"""Run a config's get_sweep() as one training run per point, then tabulate and plot results.

    python launch/sweep.py --config configs/X.py[:ARG] --backend local|slurm|tpu \
        [--parallel N] [--dry-run] [--sweep-dir DIR] [-- extra train args]
    python launch/sweep.py report --sweep-dir DIR [--x KEY] [--group KEY] [--panel KEY] \
        [--metric final_loss] [--maximize]

Each point gets a stable directory ``DIR/<name>`` (name from its overrides, see
ditjax.sweep.point_name) holding ``sweep_point.json`` (overrides and exact commands), the
logs, and the run's ``final_metrics.json``.  A point whose final_metrics.json exists is
skipped, so re-running the same command resumes an interrupted or partly failed sweep.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import math
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python launch/sweep.py` from a checkout: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ditjax import sweep as hyper
from launch import common, slurm, tpu_pod

METRICS = "final_metrics.json"
RECORD = "sweep_point.json"
DEFAULT_TRAIN_CMD = {  # where each backend's python lives
    "local": f"{shlex.quote(sys.executable)} {common.TRAIN_MODULE}",
    "slurm": f"python {common.TRAIN_MODULE}",
    "tpu": tpu_pod.REMOTE_TRAIN_CMD,
}


@dataclass(frozen=True)
class SweepPoint:
    name: str
    overrides: dict[str, Any]
    record_dir: Path  # local: sweep_point.json, logs, final_metrics.json
    workdir: str  # where training writes; differs from record_dir only for tpu --remote-dir

    @property
    def finished(self) -> bool:
        return (self.record_dir / METRICS).exists()


def default_sweep_dir(config_spec: str) -> Path:
    path, arg = hyper.parse_config_spec(config_spec)
    return Path("runs", "sweeps", path.stem + (f"-{hyper.slugify(arg)}" if arg else ""))


def plan(config_spec: str, sweep_dir: Path, remote_dir: str | None = None) -> list[SweepPoint]:
    points = []
    for overrides in hyper.load_sweep(config_spec):
        name = hyper.point_name(overrides)
        workdir = f"{remote_dir.rstrip('/')}/{name}" if remote_dir else str(sweep_dir / name)
        points.append(SweepPoint(name, overrides, sweep_dir / name, workdir))
    return points


def write_record(point: SweepPoint, config: str, backend: str, commands: Sequence[Sequence[str]]) -> None:
    point.record_dir.mkdir(parents=True, exist_ok=True)
    record = {"name": point.name, "config": config, "overrides": point.overrides, "backend": backend,
              "workdir": point.workdir, "commands": [shlex.join(c) for c in commands]}
    (point.record_dir / RECORD).write_text(json.dumps(record, indent=2) + "\n")


# ----------------------------------------------------------------------------- local / tpu


def gpu_slots(gpus: str | None, parallel: int) -> list[dict[str, str]]:
    """Splits ``--gpus 0,1,2,3`` evenly over the parallel slots, so concurrent runs never share a GPU."""
    if not gpus:
        return [{} for _ in range(parallel)]
    ids = gpus.split(",")
    if len(ids) % parallel:
        raise ValueError(f"--gpus lists {len(ids)} GPUs, not a multiple of --parallel {parallel}")
    k = len(ids) // parallel
    return [{"CUDA_VISIBLE_DEVICES": ",".join(ids[i * k:(i + 1) * k])} for i in range(parallel)]


class _Children:
    """The running points' processes; once stopped, none starts (a worker may be about to)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: list[subprocess.Popen] = []
        self._stopped = False

    def start(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen | None:
        with self._lock:
            if self._stopped:
                return None
            self._procs.append(subprocess.Popen(cmd, **kwargs))
            return self._procs[-1]

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            for proc in self._procs:
                proc.terminate()  # a no-op for those already finished


def _run_point(point: SweepPoint, commands: Sequence[Sequence[str]], slots: queue.Queue,
               children: _Children) -> str | None:
    """Runs one point's commands in order; returns why it failed, or None."""
    env = slots.get()
    try:
        with open(point.record_dir / "stdout.log", "w") as log:
            for cmd in commands:
                log.write(f"$ {shlex.join(cmd)}\n")
                log.flush()
                try:
                    proc = children.start(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
                except OSError as e:
                    log.write(f"{e}\n")
                    return "exit 127"
                if proc is None:
                    return "interrupted"
                rc = proc.wait()
                if rc:
                    return f"exit {rc}"
    finally:
        slots.put(env)
    return None if point.finished else f"exit 0 but no {METRICS}"


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_points(jobs: Sequence[tuple[SweepPoint, list[list[str]]]], parallel: int,
               gpus: str | None = None) -> list[tuple[SweepPoint, str]]:
    """Runs points with up to ``parallel`` at once; one failure never stops the others.

    Ctrl-C or SIGTERM (`kill`, `timeout`, a scheduler) ends the running points too: left
    behind, they would race a re-launch that starts the same points in the same workdirs.
    """
    slots: queue.Queue = queue.Queue()
    for slot in gpu_slots(gpus, parallel):
        slots.put(slot)
    children = _Children()
    failures = []
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
            futures = {pool.submit(_run_point, p, cmds, slots, children): p for p, cmds in jobs}
            try:
                for i, future in enumerate(concurrent.futures.as_completed(futures), 1):
                    point, why = futures[future], future.result()
                    print(f"[{i}/{len(jobs)}] {'FAILED' if why else 'done'} {point.name}"
                          + (f" ({why})" if why else ""), flush=True)
                    if why:
                        failures.append((point, why))
            except KeyboardInterrupt:
                pool.shutdown(wait=False, cancel_futures=True)
                children.stop()
                raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return failures


# ----------------------------------------------------------------------------- slurm


def active_slurm_jobs() -> set[str]:
    """Names of this user's queued/running jobs, so a re-launch does not submit a point twice."""
    try:
        out = subprocess.run(["squeue", "--me", "--noheader", "--format=%j"], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return set()
    return {line.strip() for line in out.splitlines() if line.strip()}


def submit_slurm(points: Sequence[SweepPoint], job: slurm.SlurmJob, args: argparse.Namespace,
                 extra: Sequence[str]) -> list[tuple[SweepPoint, str]]:
    failures = []
    for p in points:
        train = common.train_argv(args.config, p.workdir, p.overrides, extra, args.train_cmd)
        script_path = p.record_dir / "job.sbatch"
        script = slurm.render_script(job, train, p.name, f"{p.record_dir}/slurm-%j.out")
        sbatch = slurm.sbatch_argv(str(script_path))
        if args.dry_run:
            print(f"# {script_path}\n{script}{shlex.join(sbatch)}\n")
            continue
        write_record(p, args.config, "slurm", [train])
        script_path.write_text(script)
        if common.run_or_print([sbatch], dry_run=False):
            failures.append((p, "sbatch failed"))
    return failures


# ----------------------------------------------------------------------------- launch


def launch(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: Sequence[str]) -> int:
    tpu = None
    if args.backend == "tpu":
        tpu = tpu_pod.tpu_from_args(parser, args)
        common.require(parser, args, "remote_dir")
        if args.parallel != 1:
            parser.error("--backend tpu runs one point at a time on the TPU (use --parallel 1)")
    args.train_cmd = args.train_cmd or DEFAULT_TRAIN_CMD[args.backend]
    sweep_dir = Path(args.sweep_dir) if args.sweep_dir else default_sweep_dir(args.config)
    points = plan(args.config, sweep_dir, args.remote_dir if tpu else None)
    todo = [p for p in points if not p.finished]
    print(f"sweep {sweep_dir}: {len(points)} points, {len(points) - len(todo)} finished (skipped), "
          f"{len(todo)} to run on {args.backend}", flush=True)
    if args.backend == "slurm":
        job = slurm.job_from_args(parser, args)
        active = active_slurm_jobs()
        for p in todo:
            if p.name in active:
                print(f"skip {p.name}: already queued or running")
        todo = [p for p in todo if p.name not in active]
        failures = submit_slurm(todo, job, args, extra)
        return 0 if args.dry_run else _summary(failures, todo, "submitted")
    jobs = []
    for p in todo:
        train = common.train_argv(args.config, p.workdir, p.overrides, extra, args.train_cmd)
        # On a TPU: train on all workers, then fetch the metrics that skipping and `report` read.
        jobs.append((p, [train] if tpu is None else [
            tpu_pod.train_command(tpu, train),
            ["gcloud", "storage", "cp", f"{p.workdir}/{METRICS}", str(p.record_dir / METRICS)]]))
    setup = []
    if tpu and jobs:
        setup = tpu_pod.setup_commands(tpu, not args.no_sync, args.remote_python, args.pip_extra)
    if args.dry_run:
        if args.gpus:
            print(f"# GPU slots, each running point takes a free one: {gpu_slots(args.gpus, args.parallel)}")
        common.run_or_print(setup, dry_run=True)
        for p, commands in jobs:
            print(f"# {p.name}")
            common.run_or_print(commands, dry_run=True)
        return 0
    if common.run_or_print(setup, dry_run=False):
        print("TPU setup failed; no point was started", file=sys.stderr)
        return 1
    for p, commands in jobs:
        write_record(p, args.config, args.backend, commands)
    try:
        failures = run_points(jobs, args.parallel, args.gpus)
    except KeyboardInterrupt:
        print("interrupted: the running points were stopped; re-launch to resume", file=sys.stderr)
        return 130
    return _summary(failures, todo, "finished")


def _summary(failures: Sequence[tuple[SweepPoint, str]], launched: Sequence[SweepPoint], ok: str) -> int:
    print(f"== {len(launched) - len(failures)} of {len(launched)} points {ok}, {len(failures)} failed")
    for p, why in failures:
        print(f"FAILED {p.name} ({why}); see {p.record_dir}")
    return 1 if failures else 0


# ----------------------------------------------------------------------------- report


def collect_results(sweep_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """One flat row per point (name, status, overrides, final metrics) and the override keys."""
    rows, keys = [], {}
    for record_path in sorted(sweep_dir.glob(f"*/{RECORD}")):
        record = json.loads(record_path.read_text())
        metrics_path = record_path.parent / METRICS
        metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
        clash = record["overrides"].keys() & metrics.keys()
        if clash:
            raise ValueError(f"{record_path.parent}: metric names equal override keys {sorted(clash)}")
        keys.update(dict.fromkeys(record["overrides"]))
        rows.append({"name": record["name"], "status": "finished" if metrics else "unfinished",
                     **record["overrides"], **metrics})
    return rows, sorted(keys)


def write_csv(rows: Sequence[dict[str, Any]], override_keys: Sequence[str], path: Path) -> None:
    """Columns: name, status, the override keys, then the metrics (both sorted)."""
    fixed = ["name", "status", *override_keys]
    metrics = sorted({k for row in rows for k in row} - set(fixed))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fixed + metrics, restval="")
        writer.writeheader()
        writer.writerows(rows)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _sort_key(v: Any) -> tuple:
    return (0, v, "") if _is_num(v) else (1, 0, str(v))


def _finite(v: Any) -> bool:
    return _is_num(v) and math.isfinite(v)


def _fmt(v: Any) -> str:
    """Shows float powers of two as such, since learning rates are swept on log2 grids."""
    if isinstance(v, float) and v > 0 and math.log2(v).is_integer():
        return f"{v:g} (2^{int(math.log2(v))})"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _groups(rows: Sequence[dict], *keys: str | None) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for row in rows:
        out.setdefault(tuple(row.get(k) if k else None for k in keys), []).append(row)
    return dict(sorted(out.items(), key=lambda kv: [_sort_key(v) for v in kv[0]]))


def default_x(rows: Sequence[dict], override_keys: Sequence[str], exclude: Sequence[str | None]) -> str:
    """The swept key with the most distinct values: the natural x-axis of a sweep plot."""
    counts = {k: len({json.dumps(r.get(k)) for r in rows}) for k in override_keys if k not in exclude}
    if not counts or max(counts.values()) < 2:
        raise ValueError("no swept key to use as --x; pass one")
    return max(counts, key=counts.get)


def best_table(rows: Sequence[dict], x: str, metric: str, group: str | None = None,
               panel: str | None = None, maximize: bool = False) -> list[dict[str, Any]]:
    """Per (panel, group): the x with the best finite metric; diverged (NaN/inf) runs never win."""
    table = []
    for (pv, gv), members in _groups(rows, panel, group).items():
        scored = [r for r in members if _finite(r.get(metric)) and r.get(x) is not None]
        best = (max if maximize else min)(scored, key=lambda r: r[metric]) if scored else None
        entry = {panel: pv} if panel else {}
        entry.update({group: gv} if group else {})
        entry.update({f"best {x}": best[x] if best else None, metric: best[metric] if best else None,
                      "finite/total": f"{len(scored)}/{len(members)}"})
        table.append(entry)
    return table


def markdown(table: Sequence[dict[str, Any]]) -> str:
    headers = list(table[0]) if table else []
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join("-" if r[h] is None else _fmt(r[h]) for h in headers) + " |" for r in table]
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict], x: str, metric: str, path: Path, group: str | None = None,
         panel: str | None = None, xscale: str = "auto", maximize: bool = False) -> None:
    """metric vs x, one curve per group value, one panel per panel value; stars mark each best."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs_all = [r[x] for r in rows if r.get(x) is not None]
    numeric = all(_is_num(v) for v in xs_all)
    categories = sorted({str(v) for v in xs_all})
    if xscale == "auto":  # log2 when x spans >= 3 octaves, as lr and width grids do
        spread = numeric and xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 8
        xscale = "log2" if spread else "linear"
    panels = _groups(rows, panel)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), sharey=True, squeeze=False)
    for ax, ((pv,), members) in zip(axes[0], panels.items()):
        for (gv,), curve in _groups(members, group).items():
            pts = sorted(((r[x], r[metric]) for r in curve if r.get(x) is not None and _finite(r.get(metric))),
                         key=lambda p: _sort_key(p[0]))
            if not pts:
                continue
            xs = [p[0] if numeric else categories.index(str(p[0])) for p in pts]
            ys = [p[1] for p in pts]
            (line,) = ax.plot(xs, ys, marker="o", label=str(gv) if group else None)
            i = ys.index(max(ys) if maximize else min(ys))
            ax.plot(xs[i], ys[i], marker="*", markersize=14, color=line.get_color())
        if xscale == "log2":
            ax.set_xscale("log", base=2)
        if not numeric:
            ax.set_xticks(range(len(categories)), categories, rotation=30)
        ax.set_title(f"{panel}={pv}" if panel else metric)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        if group:
            ax.legend(title=group)
    axes[0][0].set_ylabel(metric)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(args: argparse.Namespace) -> int:
    sweep_dir = Path(args.sweep_dir)
    rows, override_keys = collect_results(sweep_dir)
    if not rows:
        print(f"no {RECORD} under {sweep_dir}", file=sys.stderr)
        return 1
    write_csv(rows, override_keys, sweep_dir / "results.csv")
    x = args.x or default_x(rows, override_keys, [args.group, args.panel])
    table = best_table(rows, x, args.metric, args.group, args.panel, args.maximize)
    (sweep_dir / "best.md").write_text(markdown(table))
    plot(rows, x, args.metric, sweep_dir / "report.png", args.group, args.panel, args.xscale, args.maximize)
    done = sum(r["status"] == "finished" for r in rows)
    print(f"{done}/{len(rows)} points finished; wrote {sweep_dir / 'results.csv'}, "
          f"{sweep_dir / 'report.png'}, {sweep_dir / 'best.md'}\n")
    print(markdown(table), end="")
    return 0


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        parser = argparse.ArgumentParser(prog="sweep.py report", description="Tabulate and plot a sweep.")
        parser.add_argument("--sweep-dir", required=True)
        parser.add_argument("--x", help="x-axis override key (default: the key with most values)")
        parser.add_argument("--group", help="one curve per value of this key, e.g. model.hidden_size")
        parser.add_argument("--panel", help="one panel per value of this key, e.g. model.parametrization")
        parser.add_argument("--metric", default="final_loss")
        parser.add_argument("--maximize", action="store_true", help="higher metric is better (accuracy)")
        parser.add_argument("--xscale", choices=["auto", "linear", "log2"], default="auto")
        return report(parser.parse_args(argv[1:]))
    own, extra = common.split_passthrough(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="configs/FILE.py[:ARG] defining get_sweep()")
    parser.add_argument("--backend", choices=["local", "slurm", "tpu"], default="local")
    parser.add_argument("--sweep-dir", help="default runs/sweeps/<config>[-<arg>]")
    parser.add_argument("--parallel", type=int, default=1, help="local: points run at once")
    parser.add_argument("--gpus", help="local: GPU ids split over the parallel slots, e.g. 0,1,2,3")
    parser.add_argument("--train-cmd", help="what runs a point (default: python -m ditjax.train)")
    parser.add_argument("--dry-run", action="store_true", help="print commands / job scripts only")
    parser.add_argument("--remote-dir", help="tpu: gs:// prefix for the points' workdirs")
    slurm.add_slurm_args(parser)
    tpu_pod.add_tpu_args(parser)
    args = parser.parse_args(own)
    if args.parallel < 1:
        parser.error("--parallel must be >= 1")
    try:
        gpu_slots(args.gpus, args.parallel)
    except ValueError as e:
        parser.error(str(e))
    return launch(parser, args, extra)


if __name__ == "__main__":
    sys.exit(main())
