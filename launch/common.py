"""What every launcher shares: the train command line, `--` pass-through, dry-run/run.

Keeping the train command in one place means a local run, a Slurm job, a TPU pod and an
xpk workload all start training exactly the same way.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

TRAIN_MODULE = "-m ditjax.train"


def format_value(value: Any) -> str:
    """Spells a value the way ml_collections' config_flags parses it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    return repr(value)  # repr keeps a float's every digit: 2**-10 -> 0.0009765625


def train_argv(config: str, workdir: str, overrides: Mapping[str, Any] | None = None,
               extra: Sequence[str] = (), train_cmd: str = f"python {TRAIN_MODULE}") -> list[str]:
    """``<train_cmd> --config C --workdir W --config.k=v ... <extra>`` as an argv list."""
    argv = [*shlex.split(train_cmd), "--config", config, "--workdir", workdir]
    argv += [f"--config.{k}={format_value(v)}" for k, v in (overrides or {}).items()]
    return argv + list(extra)


def split_passthrough(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Splits ``[launcher args] -- [extra train args]``."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def require(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """Errors on missing options that are required only in some modes (e.g. one backend)."""
    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is None]
    if missing:
        parser.error(f"missing required option(s): {' '.join(missing)}")


def run_or_print(commands: Sequence[Sequence[str]], dry_run: bool) -> int:
    """Prints each command (dry run) or runs them in order, stopping at the first failure."""
    for cmd in commands:
        print(shlex.join(cmd), flush=True)
        if dry_run:
            continue
        try:
            rc = subprocess.run(list(cmd)).returncode
        except OSError as e:  # e.g. gcloud / sbatch / xpk not installed here
            print(f"cannot run {cmd[0]}: {e}", file=sys.stderr)
            rc = 127
        if rc:
            return rc
    return 0
