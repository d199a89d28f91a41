"""Train on GKE (TPU slices or GPU nodes) through xpk: builds one `xpk workload create`.

    python launch/gke_xpk.py --cluster my-cluster --workload dit-xl2-a --tpu-type v5p-128 \
        --num-slices 2 --docker-image gcr.io/proj/ditjax:latest \
        --config configs/imagenet_latent.py --workdir gs://bucket/runs/dit_xl2 [--dry-run] [-- ...]

xpk starts the same command in every pod; ditjax initialises jax.distributed from the
environment GKE/xpk provide (multislice included), so the command is the plain train
command.  Use --docker-image for an image that already holds this checkout and its
dependencies, or --base-docker-image to let xpk layer the current directory onto a base
image (quicker while iterating).  The workdir must be gs://... so all pods share it.
"""
from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # `python launch/gke_xpk.py` from a checkout: make `launch` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch import common

# xpk's own rule (its parser rejects anything else, but only after building images).
_WORKLOAD = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def xpk_argv(args: argparse.Namespace, train: Sequence[str]) -> list[str]:
    """The `xpk workload create` argv for parsed launcher options and a train argv."""
    argv = ["xpk", "workload", "create", f"--cluster={args.cluster}", f"--workload={args.workload}"]
    argv += [f"--tpu-type={args.tpu_type}"] if args.tpu_type else [f"--device-type={args.device_type}"]
    argv.append(f"--num-slices={args.num_slices}")
    if args.num_nodes is not None:
        argv.append(f"--num-nodes={args.num_nodes}")
    argv.append(f"--docker-image={args.docker_image}" if args.docker_image
                else f"--base-docker-image={args.base_docker_image}")
    for flag in ("project", "zone", "priority", "max_restarts"):
        if getattr(args, flag) is not None:
            argv.append(f"--{flag.replace('_', '-')}={getattr(args, flag)}")
    return argv + list(args.xpk_arg) + [f"--command={shlex.join(train)}"]


def main(argv: Sequence[str] | None = None) -> int:
    own, extra = common.split_passthrough(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--workload", required=True, help="unique name, <= 40 chars of [a-z0-9-]")
    device = parser.add_mutually_exclusive_group(required=True)
    device.add_argument("--tpu-type", help="e.g. v5p-128")
    device.add_argument("--device-type", help="e.g. h100-80gb-8 (GPU nodes) or a TPU type")
    parser.add_argument("--num-slices", type=int, default=1, help="TPU slices (multislice over DCN)")
    parser.add_argument("--num-nodes", type=int, help="GPU nodes for --device-type GPU workloads")
    image = parser.add_mutually_exclusive_group(required=True)
    image.add_argument("--docker-image", help="image already holding ditjax and its dependencies")
    image.add_argument("--base-docker-image", help="xpk adds the current directory on top of it")
    parser.add_argument("--project")
    parser.add_argument("--zone")
    parser.add_argument("--priority", choices=["very-low", "low", "medium", "high", "very-high"])
    parser.add_argument("--max-restarts", type=int, help="restart the workload on failure/preemption")
    parser.add_argument("--xpk-arg", action="append", default=[], metavar="ARG",
                        help="extra xpk flag, repeatable, e.g. --xpk-arg=--spot")
    parser.add_argument("--config", required=True, help="configs/FILE.py[:ARG], relative to the repo root")
    parser.add_argument("--workdir", required=True, help="gs://... shared by all pods")
    parser.add_argument("--train-cmd", default=f"python3 {common.TRAIN_MODULE}")
    parser.add_argument("--dry-run", action="store_true", help="print the xpk command only")
    args = parser.parse_args(own)
    if not (_WORKLOAD.fullmatch(args.workload) and len(args.workload) <= 40):
        parser.error(f"--workload must be <= 40 chars matching {_WORKLOAD.pattern}, got {args.workload!r}")
    train = common.train_argv(args.config, args.workdir, extra=extra, train_cmd=args.train_cmd)
    return common.run_or_print([xpk_argv(args, train)], args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
