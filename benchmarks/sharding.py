"""The cost of sharding itself: train-step time of configs/default.py with FSDP over N simulated CPU
devices ÷ the same step on one device, both measured in one process on the same cores.

    python benchmarks/sharding.py [--devices 8] [--steps 30] [--json FILE]

Simulated devices share the host's cores, so the total arithmetic is the same in both runs and the ratio
isolates what sharding adds: partitioned programs, collectives, per-device dispatch. It says nothing about
speed-up on real chips. Reports the median step time (device-synchronised) after two warm-up steps.
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Step time with FSDP over N simulated CPU devices ÷ 1 device.")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", default=None)
    return parser.parse_args()


if __name__ == "__main__":  # the device count must be set before jax starts
    ARGS = parse_args()
    os.environ.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={ARGS.devices}", JAX_PLATFORMS="cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import datetime
import json
import platform
import statistics
import time

import jax
import numpy as np

from configs.default import get_config
from ditjax.config import model_config
from ditjax.data.pipeline import make_train_iterator
from ditjax.generate import make_objective
from ditjax.parallel.mesh import make_mesh, resolve_rules
from ditjax.train.optim import make_optimizer
from ditjax.train.state import abstract_model, init_train_state
from ditjax.train.step import make_train_step


def step_seconds(devices: list, fsdp: int, steps: int, batches: list[dict]) -> float:
    """Median seconds per train step of configs/default.py on ``devices`` (fsdp over all of them)."""
    config = get_config()
    config.mesh.update(data=1, fsdp=fsdp)
    config.mesh.rules = "fsdp" if fsdp > 1 else "dp"
    mesh, rules = make_mesh(config.mesh, devices), resolve_rules(config.mesh)
    model_cfg = model_config(config)
    tx, schedule = make_optimizer(config.optim, config.train.num_steps)
    state, shardings = init_train_state(model_cfg, tx, config.seed, mesh, rules)
    graphdef, abstract_state = abstract_model(model_cfg)
    step_fn, data_sharding = make_train_step(graphdef, abstract_state,
                                             make_objective(config.objective.to_dict(), model_cfg.learn_sigma), tx,
                                             schedule, config.train, mesh, rules, shardings)
    device_batches = [{k: jax.make_array_from_process_local_data(data_sharding[k], v) for k, v in b.items()}
                      for b in batches]
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        state, metrics = step_fn(state, device_batches[i % len(device_batches)])
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def main(args: argparse.Namespace) -> None:
    config = get_config()
    data = make_train_iterator(config.data, global_batch_size=config.train.global_batch_size, seed=0)
    batches = [{k: np.asarray(v) for k, v in next(data).items()} for _ in range(4)]
    one = step_seconds(jax.devices()[:1], 1, args.steps, batches)
    many = step_seconds(jax.devices(), args.devices, args.steps, batches)
    result = {
        "config": "configs/default.py", "global_batch_size": config.train.global_batch_size,
        "devices": args.devices, "steps": args.steps,
        "one_device_step_s": one, "fsdp_step_s": many, "ratio": many / one,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
        "date": datetime.date.today().isoformat(), "jax": jax.__version__,
    }
    print(f"configs/default.py, global batch {result['global_batch_size']}: 1 device {one * 1e3:.1f} ms/step, "
          f"FSDP over {args.devices} simulated devices {many * 1e3:.1f} ms/step → ratio {many / one:.2f} "
          f"({result['machine']}, {result['date']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main(ARGS)
