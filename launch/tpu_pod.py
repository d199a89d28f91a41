"""Train on a Cloud TPU VM or pod slice: copy the code, set it up, run on every worker.

    python launch/tpu_pod.py --tpu my-v5p-64 --zone us-east5-a --project my-proj \
        --config configs/imagenet_latent.py --workdir gs://bucket/runs/dit_xl2 [--dry-run] [-- ...]

Steps, each printed by --dry-run exactly as run (from the repository root):
  1. pack the checkout (files git tracks or would track, so uncommitted edits travel and
     .venv/runs do not) into runs/ditjax-code.tgz;
  2. `gcloud compute tpus tpu-vm scp` it to every worker;
  3. on every worker: unpack into ~/ditjax, create ~/ditjax/.venv if missing, `pip install -e .`
     plus jax[tpu]; safe to repeat, so re-launching reuses the environment;
  4. on every worker: the train command.  Every worker must run it: ditjax initialises
     jax.distributed from the TPU environment and each host feeds its own chips.
The workdir must be one every worker writes to, i.e. gs://...
"""
from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python launch/tpu_pod.py` from a checkout: make `launch` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch import common

CODE_DIR = "ditjax"  # on the workers, relative to the ssh user's home
BUNDLE = "runs/ditjax-code.tgz"  # local, relative to the repository root (runs/ is git-ignored)
REMOTE_TRAIN_CMD = f".venv/bin/python {common.TRAIN_MODULE}"


@dataclass(frozen=True)
class Tpu:
    name: str
    zone: str
    project: str | None = None
    worker: str = "all"


def add_tpu_args(parser: argparse.ArgumentParser) -> None:
    """Adds the TPU options (callers `require` --tpu and --zone when they use them)."""
    g = parser.add_argument_group("tpu")
    g.add_argument("--tpu", help="TPU VM / pod slice name")
    g.add_argument("--zone")
    g.add_argument("--project", help="default: gcloud's configured project")
    g.add_argument("--worker", default="all", help="'all', or worker ids such as 0,1")
    g.add_argument("--no-sync", action="store_true",
                   help="skip copying the code (it is already on the workers, e.g. via git clone)")
    g.add_argument("--remote-python", default="python3",
                   help="interpreter for the workers' venv; ditjax needs Python >= 3.12")
    g.add_argument("--pip-extra", default="jax[tpu]", help="installed alongside `-e .`")


def tpu_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Tpu:
    common.require(parser, args, "tpu", "zone")
    return Tpu(args.tpu, args.zone, args.project, args.worker)


def _gcloud(tpu: Tpu, verb: str, *args: str) -> list[str]:
    project = [f"--project={tpu.project}"] if tpu.project else []
    return ["gcloud", "compute", "tpus", "tpu-vm", verb, *args, f"--zone={tpu.zone}", *project,
            f"--worker={tpu.worker}"]


def ssh(tpu: Tpu, command: str) -> list[str]:
    """Runs a shell command on the selected workers (all of them by default)."""
    return _gcloud(tpu, "ssh", tpu.name, f"--command={command}")


def setup_commands(tpu: Tpu, sync: bool = True, remote_python: str = "python3",
                   pip_extra: str = "jax[tpu]") -> list[list[str]]:
    """Pack + copy the code (if ``sync``), then an idempotent venv + editable install."""
    # Double quotes keep the printed --command readable; requirement specs hold no `"` or `$`.
    install = (f"cd {CODE_DIR} && (test -x .venv/bin/python || {remote_python} -m venv .venv)"
               f' && .venv/bin/pip install -q -e . "{pip_extra}"')
    if not sync:
        return [ssh(tpu, install)]
    pack = (f"mkdir -p {Path(BUNDLE).parent} && git ls-files -z --cached --others --exclude-standard"
            f" | tar -czf {BUNDLE} --null -T -")
    return [["bash", "-c", pack],
            _gcloud(tpu, "scp", BUNDLE, f"{tpu.name}:{CODE_DIR}.tgz"),
            ssh(tpu, f"mkdir -p {CODE_DIR} && tar -xzf {CODE_DIR}.tgz -C {CODE_DIR} && {install}")]


def train_command(tpu: Tpu, train: Sequence[str]) -> list[str]:
    """The train argv run from the code directory on every selected worker."""
    return ssh(tpu, f"cd {CODE_DIR} && {shlex.join(train)}")


def main(argv: Sequence[str] | None = None) -> int:
    own, extra = common.split_passthrough(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="configs/FILE.py[:ARG], relative to the repo root")
    parser.add_argument("--workdir", required=True, help="gs://... (every worker writes to it)")
    parser.add_argument("--train-cmd", default=REMOTE_TRAIN_CMD)
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    add_tpu_args(parser)
    args = parser.parse_args(own)
    tpu = tpu_from_args(parser, args)
    train = common.train_argv(args.config, args.workdir, extra=extra, train_cmd=args.train_cmd)
    commands = [*setup_commands(tpu, not args.no_sync, args.remote_python, args.pip_extra),
                train_command(tpu, train)]
    return common.run_or_print(commands, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
