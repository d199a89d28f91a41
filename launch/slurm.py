"""Multi-node GPU training under Slurm: write one sbatch script and submit it.

    python launch/slurm.py --nodes 4 --gpus-per-node 8 --partition gpu --time 24:00:00 \
        --config configs/default.py --workdir /shared/runs/dit_b2 [--dry-run] [-- --config.x=y]

Layout: one process per node driving all of that node's GPUs (``srun --ntasks-per-node=1``).
That is JAX's usual GPU layout: N processes to coordinate instead of N*G, and no
CUDA_VISIBLE_DEVICES bookkeeping.  The script passes the coordinator (first host of the
allocation, a port derived from the job id so two jobs sharing a head node do not
collide), SLURM_NTASKS and SLURM_PROCID to ditjax explicitly; jax.distributed could find
them itself, but explicit flags make a failed bring-up readable from the script alone.
"""
from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python launch/slurm.py` from a checkout: make `launch` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch import common

_TIME = re.compile(r"(\d+-)?\d{1,2}:\d{2}:\d{2}")

# Per-task values must expand inside each task, hence `bash -c '...'` with the train argv as "$@".
_SRUN = ("srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c "
         "'exec \"$@\" --coordinator_address \"$COORDINATOR_ADDRESS\" "
         "--num_processes \"$SLURM_NTASKS\" --process_id \"$SLURM_PROCID\"' train")


@dataclass(frozen=True)
class SlurmJob:
    """The resources and environment setup shared by every job of a launch."""
    nodes: int
    gpus_per_node: int
    partition: str
    time: str
    cpus_per_task: int | None = None
    sbatch_options: tuple[str, ...] = ()  # extra `#SBATCH` options, e.g. "--account=abc"
    setup: tuple[str, ...] = ()  # shell lines run before srun, e.g. "source .venv/bin/activate"


def add_slurm_args(parser: argparse.ArgumentParser) -> None:
    """Adds the Slurm options (no defaults for the site-specific ones: callers `require` them)."""
    g = parser.add_argument_group("slurm")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=8)
    g.add_argument("--partition")
    g.add_argument("--time", help="wall-clock limit, [D-]HH:MM:SS")
    g.add_argument("--cpus-per-task", type=int)
    g.add_argument("--sbatch-opt", action="append", default=[], metavar="OPT",
                   help="extra #SBATCH option, repeatable, e.g. --sbatch-opt=--account=abc")
    g.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="shell line run before srun, repeatable, e.g. 'source .venv/bin/activate'")


def job_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> SlurmJob:
    common.require(parser, args, "partition", "time")
    if not _TIME.fullmatch(args.time):
        parser.error(f"--time must be [D-]HH:MM:SS, got {args.time!r}")
    return SlurmJob(args.nodes, args.gpus_per_node, args.partition, args.time, args.cpus_per_task,
                    tuple(args.sbatch_opt), tuple(args.setup))


def render_script(job: SlurmJob, train: Sequence[str], job_name: str, log_path: str) -> str:
    """The sbatch script that runs ``train`` once per node."""
    options = [f"--job-name={job_name}", f"--nodes={job.nodes}", "--ntasks-per-node=1",
               f"--gpus-per-node={job.gpus_per_node}", f"--partition={job.partition}",
               f"--time={job.time}", f"--output={log_path}"]
    if job.cpus_per_task:
        options.append(f"--cpus-per-task={job.cpus_per_task}")
    lines = ["#!/bin/bash", *(f"#SBATCH {o}" for o in (*options, *job.sbatch_options)),
             "# One process per node drives all of its GPUs; the first node coordinates.",
             "set -euo pipefail", *job.setup,
             'COORDINATOR_HOST="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"',
             'export COORDINATOR_ADDRESS="${COORDINATOR_HOST}:$((20000 + SLURM_JOB_ID % 20000))"',
             f"{_SRUN} {shlex.join(train)}"]
    return "\n".join(lines) + "\n"


def sbatch_argv(script_path: str) -> list[str]:
    return ["sbatch", script_path]


def main(argv: Sequence[str] | None = None) -> int:
    own, extra = common.split_passthrough(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="configs/FILE.py[:ARG]")
    parser.add_argument("--workdir", required=True, help="on a filesystem every node sees")
    parser.add_argument("--job-name", default="ditjax")
    parser.add_argument("--script", help="where to write the sbatch script (default WORKDIR/job.sbatch)")
    parser.add_argument("--train-cmd", default=f"python {common.TRAIN_MODULE}")
    parser.add_argument("--dry-run", action="store_true", help="print the script and sbatch command only")
    add_slurm_args(parser)
    args = parser.parse_args(own)
    job = job_from_args(parser, args)
    script_path = Path(args.script or f"{args.workdir}/job.sbatch")
    train = common.train_argv(args.config, args.workdir, extra=extra, train_cmd=args.train_cmd)
    script = render_script(job, train, args.job_name, f"{args.workdir}/slurm-%j.out")
    if args.dry_run:
        print(f"# {script_path}\n{script}", end="")
    else:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        script_path.parent.mkdir(parents=True, exist_ok=True)
        script_path.write_text(script)
    return common.run_or_print([sbatch_argv(str(script_path))], args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
