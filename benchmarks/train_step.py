"""Time the trainer's jitted train step (forward + backward + AdamW + EMA) and report img/s and MFU.

The step is built exactly as ``python -m ditjax.train`` builds it (init_train_state + make_train_step on
a mesh from ``config.mesh``), on DiT's DDPM hybrid loss with learned sigma, so the number is the
trainer's, not a micro-benchmark's. It is meant to be run side by side with the PyTorch reference
(``torch_dit_reference.py`` of the shared bench) on the same machine.

    python benchmarks/train_step.py --arch DiT-S/2 --batch 32 --latent-size 32 --precision fp32
    python benchmarks/train_step.py --config configs/default.py      # a config file's own step

On a busy shared machine a step is only counted if other processes used less than ``--max-foreign``
of its wall time in CPU (``/proc/stat`` minus this process's CPU time); the script keeps stepping
until ``--steps`` clean steps or ``--max-steps`` in all, and says how many were clean.
MFU = model FLOPs (3 × 2 × forward MACs, DiT's convention) ÷ step time ÷ this machine's peak, measured
per run as the best of five jitted 4096² matmuls at the step's precision (bf16 → fp32 accumulate).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from ditjax import runtime  # noqa: E402

runtime.configure()  # allocator and XLA flags: must precede the first jax import

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from ditjax.config import base_config, model_config, set_arch  # noqa: E402
from ditjax.generate import make_objective  # noqa: E402
from ditjax.parallel.mesh import make_mesh, resolve_rules  # noqa: E402
from ditjax.train.metrics import measured_matmul_peak, train_flops_per_image  # noqa: E402
from ditjax.train.optim import make_optimizer  # noqa: E402
from ditjax.train.state import abstract_model, init_train_state, state_shardings  # noqa: E402
from ditjax.train.step import make_train_step  # noqa: E402

PRECISIONS = {"fp32": "float32", "bf16": "bfloat16"}
TICK = os.sysconf("SC_CLK_TCK")


def bench_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
    """A config file's run config, or the torch reference's setup (DDPM, learned sigma, AdamW lr 1e-4, wd 0)."""
    if args.config:
        spec = importlib.util.spec_from_file_location("bench_cfg", args.config)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config()
    else:
        config = base_config()
        set_arch(config.model, args.arch)
        config.model.update(input_size=args.latent_size, in_channels=4, num_classes=1000, learn_sigma=True)
        config.objective.name = "ddpm"
        config.train.global_batch_size = args.batch
    if args.precision:
        config.model.dtype = PRECISIONS[args.precision]
    if args.scan is not None:
        config.model.scan_layers = args.scan
    if args.remat:
        config.model.remat_policy = args.remat
    return config


def system_busy_seconds() -> float:
    """CPU-seconds all processes have spent busy since boot (first line of /proc/stat)."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / TICK


class StepTimer:
    """One step's wall time, this process's user/system CPU and page faults, and the CPU time other
    processes took meanwhile as a fraction of the wall (what makes a step "clean")."""

    def __enter__(self) -> StepTimer:
        self.t0, self.busy0, self.use0 = time.perf_counter(), system_busy_seconds(), resource.getrusage(
            resource.RUSAGE_SELF)
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        use = resource.getrusage(resource.RUSAGE_SELF)
        self.user, self.system = use.ru_utime - self.use0.ru_utime, use.ru_stime - self.use0.ru_stime
        self.faults = use.ru_minflt - self.use0.ru_minflt
        foreign = (system_busy_seconds() - self.busy0) - (self.user + self.system)
        self.foreign = max(foreign, 0.0) / self.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="DiT-S/2")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--latent-size", type=int, default=32, help="32 = 256px images through the SD VAE")
    ap.add_argument("--precision", choices=sorted(PRECISIONS), default=None, help="compute dtype (default fp32)")
    ap.add_argument("--config", help="time this config file's step instead (its model, objective, optim, batch)")
    ap.add_argument("--steps", type=int, default=5, help="clean steps to take the median of")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many timed steps (default 3×steps)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--max-foreign", type=float, default=0.05,
                    help="a step is clean if other processes' CPU time was below this fraction of its wall time")
    ap.add_argument("--scan", action=argparse.BooleanOptionalAction, default=None, help="scan the blocks")
    ap.add_argument("--remat", choices=("none", "full", "dots", "dots_no_batch"), default=None)
    ap.add_argument("--compile-only", action="store_true", help="report trace and compile time, run nothing")
    ap.add_argument("--profile", metavar="DIR", help="write a jax.profiler trace of the timed steps to DIR")
    args = ap.parse_args()
    max_steps = args.max_steps or 3 * args.steps

    config = bench_config(args)
    model_cfg = model_config(config)
    precision = "bf16" if model_cfg.dtype == "bfloat16" else "fp32"
    tr = config.train
    mesh, rules = make_mesh(config.mesh), resolve_rules(config.mesh.rules)
    objective = make_objective(config.objective.to_dict(), model_cfg.learn_sigma)
    tx, schedule = make_optimizer(config.optim, tr.num_steps)
    graphdef, abstract_state = abstract_model(model_cfg)
    t_init = time.perf_counter()
    if args.compile_only:  # shapes and shardings suffice to compile; skip the (slow to compile) init
        state = jax.eval_shape(lambda: init_train_state(model_cfg, tx, config.seed, mesh, rules)[0])
        shardings = state_shardings(abstract_state, state, tx, mesh, rules)
        state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), state, shardings)
    else:
        state, shardings = jax.block_until_ready(init_train_state(model_cfg, tx, config.seed, mesh, rules))
    init_s = time.perf_counter() - t_init
    step_fn, data_sharding = make_train_step(graphdef, abstract_state, objective, tx, schedule, tr, mesh, rules,
                                             shardings)

    rng = np.random.default_rng(0)
    b, s, c = tr.global_batch_size, model_cfg.input_size, model_cfg.in_channels
    batch = {"image": jax.device_put(rng.standard_normal((b, s, s, c), np.float32), data_sharding["image"]),
             "label": jax.device_put(rng.integers(0, model_cfg.num_classes, b).astype(np.int32),
                                     data_sharding["label"])}

    t0 = time.perf_counter()
    lowered = step_fn.lower(state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    name = args.config and Path(args.config).name or args.arch
    head = (f"ditjax {name} batch={b} latent={s} precision={precision} scan={int(model_cfg.scan_layers)} "
            f"remat={model_cfg.remat_policy} init_s={init_s:.1f} trace_s={t1 - t0:.2f} compile_s={t2 - t1:.2f}")
    if args.compile_only:
        print(f"{head} temp_gb={temp_gb(compiled):.2f} peak_rss_gb={peak_rss_gb():.2f}", flush=True)
        return

    for _ in range(args.warmup):
        state, metrics = jax.block_until_ready(compiled(state, batch))
    if args.profile:
        jax.profiler.start_trace(args.profile, create_perfetto_trace=True)
    timers: list[StepTimer] = []
    while len(timers) < max_steps and sum(t.foreign < args.max_foreign for t in timers) < args.steps:
        with StepTimer() as timer:
            state, metrics = jax.block_until_ready(compiled(state, batch))
        timers.append(timer)
    if args.profile:
        jax.profiler.stop_trace()
    times, foreign = [t.seconds for t in timers], [t.foreign for t in timers]
    if not np.isfinite(float(metrics["loss"])):
        sys.exit(f"non-finite loss {float(metrics['loss'])}")
    clean = [t for t, f in zip(times, foreign) if f < args.max_foreign]
    step_s = statistics.median(clean or times)
    peak = measured_matmul_peak(PRECISIONS[precision], n=4096)
    flops = train_flops_per_image(model_cfg) * b
    print(f"{head} median_step_s={step_s:.4f} img_per_s={b / step_s:.2f} mfu={flops / step_s / peak:.3f} "
          f"peak_gflops={peak / 1e9:.0f} gflop_per_img={flops / b / 1e9:.2f} clean={len(clean)}/{len(times)} "
          f"foreign_cpu={statistics.median(foreign):.2f} all_median_s={statistics.median(times):.4f} "
          f"min_step_s={min(times):.4f} user_s={statistics.median(t.user for t in timers):.2f} "
          f"sys_s={statistics.median(t.system for t in timers):.2f} "
          f"faults={statistics.median(t.faults for t in timers):.0f} temp_gb={temp_gb(compiled):.2f} peak_rss_gb={peak_rss_gb():.2f} load1={os.getloadavg()[0]:.1f} "
          f"{runtime.describe()}", flush=True)


def temp_gb(compiled: jax.stages.Compiled) -> float:
    """XLA's scratch buffer for one step: activations kept for the backward pass dominate it."""
    return compiled.memory_analysis().temp_size_in_bytes / 1e9


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # ru_maxrss is in KiB on Linux


if __name__ == "__main__":
    main()
