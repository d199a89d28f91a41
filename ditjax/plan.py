"""Plan a run without running it: compile the real train step for N simulated devices and report
per-device memory, FLOPs per step and a roofline estimate of step time and MFU on a chip.

    python -m ditjax.plan --config configs/imagenet_latent.py:DiT-XL/2 --devices 64 --mesh fsdp=64 \\
        --chip v5e [--rules auto|dp|fsdp|fsdp_tp] [--json plan.json] [--config.train.global_batch_size=512]

The step is built exactly as the trainer builds it (μP plan, optimizer, objective, state shardings,
``make_train_step``) and lowered with abstract arguments (ShapeDtypeStructs carrying shardings), so
nothing is allocated and no data is read. Devices are simulated CPU devices: the command sets
``--xla_force_host_platform_device_count`` itself, re-executing if jax was already imported.

Numbers and their limits (docs/scaling.md):
* memory: XLA's buffer assignment of the compiled per-device program (arguments, outputs, donated
  aliases, temporaries). The CPU compiler fuses less than the TPU/GPU ones, so temporaries are an
  upper-side estimate.
* FLOPs: XLA's cost analysis of the compiled per-device program × devices. XLA counts a loop body once,
  so a scanned model (or gradient accumulation) is also compiled unscanned at depth 1 and 2 with one
  micro-batch and extrapolated linearly in depth: exact for a stack of identical blocks.
* time: max(compute at peak, communication at link bandwidth), assuming perfect overlap; a lower bound
  on step time, so ``est_mfu`` is an upper bound. HBM traffic from the CPU compile is reported but not
  used, as it overstates what a TPU/GPU compile moves.
"""
from __future__ import annotations

import os
import sys

_DEVICES_FLAG = "--xla_force_host_platform_device_count"
# Code-generation effort only (no HLO-level change): compiles 2× faster, same buffers and costs.
_FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")


def _requested_devices(argv: list[str]) -> int | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--devices="):
            return int(arg.split("=", 1)[1])
        if arg == "--devices" and i + 1 < len(argv):
            return int(argv[i + 1])
    return None


def simulate_devices(argv: list[str]) -> None:
    """Give this process N CPU devices: XLA reads its flags once, when jax initialises its backend."""
    n = _requested_devices(argv)
    if n is None:
        return
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICES_FLAG)]
    wanted = " ".join([*flags, f"{_DEVICES_FLAG}={n}", *(f for f in _FAST_COMPILE if f not in flags)])
    if os.environ.get("XLA_FLAGS") == wanted and os.environ.get("JAX_PLATFORMS") == "cpu":
        return
    os.environ.update(XLA_FLAGS=wanted, JAX_PLATFORMS="cpu")
    if "jax" in sys.modules:  # too late to change the backend in this process
        os.execv(sys.executable, [sys.executable, "-m", "ditjax.plan", *argv[1:]])


if __name__ == "__main__":  # before jax is imported below
    simulate_devices(sys.argv)

import dataclasses
import json
import logging
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from jax.sharding import Mesh
from ml_collections import config_flags

from ditjax import mup
from ditjax.config import ConfigError, model_config, validate
from ditjax.generate import make_objective
from ditjax.models import DiTConfig
from ditjax.parallel import costs
from ditjax.parallel.chips import CHIPS, Chip, get_chip
from ditjax.parallel.mesh import make_mesh, resolve_rules
from ditjax.parallel.rules import MESH_AXES, format_rules
from ditjax.train.metrics import train_flops_per_image
from ditjax.train.optim import make_optimizer
from ditjax.train.state import TrainState, abstract_model, abstract_train_state, state_shardings
from ditjax.train.step import make_train_step


def abstract_sharded_state(model_cfg: DiTConfig, tx: optax.GradientTransformation, mesh: Mesh,
                           rules: list) -> TrainState:
    """The train state as ShapeDtypeStructs with the trainer's shardings, allocating nothing."""
    _, abstract_state = abstract_model(model_cfg)
    params = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(abstract_state))
    shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, ema=params,
                        opt_state=jax.eval_shape(tx.init, params), rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    return abstract_train_state(model_cfg, tx, state_shardings(abstract_state, shapes, tx, mesh, rules))


def lower_train_step(config: ml_collections.ConfigDict, mesh: Mesh, rules: list) -> tuple[Any, TrainState]:
    """(lowered step, abstract state): the trainer's step for ``config``, lowered on abstract arguments."""
    plan = mup.plan_for(config, model_config(config))
    model_cfg, tr = plan.model_cfg, config.train
    tx, schedule = make_optimizer(config.optim, tr.num_steps, lr_multipliers=plan.lr_multipliers,
                                  wd_multipliers=plan.wd_multipliers)
    objective = make_objective(config.objective.to_dict(), model_cfg.learn_sigma)
    graphdef, abstract_state = abstract_model(model_cfg)
    state = abstract_sharded_state(model_cfg, tx, mesh, rules)
    shardings = jax.tree.map(lambda s: s.sharding, state)
    step_fn, data_sharding = make_train_step(graphdef, abstract_state, objective, tx, schedule, tr, mesh, rules,
                                             shardings)
    size, channels, batch = model_cfg.input_size, model_cfg.in_channels, tr.global_batch_size
    batch_spec = {"image": jax.ShapeDtypeStruct((batch, size, size, channels), jnp.float32,
                                                sharding=data_sharding["image"]),
                  "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=data_sharding["label"])}
    return step_fn.lower(state, batch_spec), state


def _compiled_costs(compiled) -> tuple[float, float]:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def per_device_costs(config: ml_collections.ConfigDict, mesh: Mesh, rules: list, compiled) -> tuple[float, float]:
    """(FLOPs, bytes accessed) of one step on one device, with loops over layers / micro-batches expanded."""
    m, tr = config.model, config.train
    if not m.scan_layers and tr.grad_accum_steps == 1:
        return _compiled_costs(compiled)
    probe = ml_collections.ConfigDict(config.to_dict())
    probe.model.scan_layers = False
    probe.train.update(grad_accum_steps=1, global_batch_size=tr.global_batch_size // tr.grad_accum_steps)
    at_depth = []
    for depth in (1, 2):
        probe.model.depth = depth
        at_depth.append(np.array(_compiled_costs(lower_train_step(probe, mesh, rules)[0].compile())))
    total = (at_depth[0] + (m.depth - 1) * (at_depth[1] - at_depth[0])) * tr.grad_accum_steps
    return float(total[0]), float(total[1])


def _state_bytes(tree: Any) -> int:
    return sum(math.prod(s.sharding.shard_shape(s.shape)) * np.dtype(s.dtype).itemsize for s in jax.tree.leaves(tree))


def replicated_params(state: TrainState, mesh: Mesh) -> tuple[list[str], float]:
    """(names, largest first; fraction of parameter elements) left whole on every device although the rules
    shard other parameters: no mesh axis divides any of their dimensions."""
    leaves = jax.tree_util.tree_leaves_with_path(state.params)
    if mesh.size == 1 or not any(any(s.sharding.spec) for _, s in leaves):
        return [], 0.0
    whole = sorted(((math.prod(s.shape), jax.tree_util.keystr(path)) for path, s in leaves
                    if not any(s.sharding.spec)), reverse=True)
    total = sum(math.prod(s.shape) for _, s in leaves)
    return [name for _, name in whole], sum(size for size, _ in whole) / total


def memory_report(state: TrainState, mem: Any) -> dict[str, int]:
    """Per-device bytes: the state's shards, and XLA's buffer assignment; peak = live inputs, outputs not
    aliased to a donated input, and temporaries."""
    memory = {
        "parameters": _state_bytes(state.params), "ema": _state_bytes(state.ema),
        "optimizer_state": _state_bytes(state.opt_state),
        "arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
        "aliased": mem.alias_size_in_bytes, "temporaries": mem.temp_size_in_bytes,
        "generated_code": mem.generated_code_size_in_bytes,
    }
    memory["total"] = (memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"]
                       + memory["generated_code"])
    return memory


def plan(config: ml_collections.ConfigDict, chip: Chip) -> dict[str, Any]:
    """Compile the step for ``config`` on all (simulated) devices and estimate its cost on ``chip``."""
    mesh, rules = make_mesh(config.mesh), resolve_rules(config.mesh)
    n, tr = mesh.size, config.train
    t0 = time.perf_counter()
    lowered, state = lower_train_step(config, mesh, rules)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    memory = memory_report(state, compiled.memory_analysis())
    flops_dev, bytes_dev = per_device_costs(config, mesh, rules, compiled)
    plan_s = time.perf_counter() - t0
    model_cfg = mup.plan_for(config, model_config(config)).model_cfg
    shape = dict(mesh.shape)
    full_param_bytes = sum(math.prod(s.shape) * np.dtype(s.dtype).itemsize for s in jax.tree.leaves(state.params))
    comm = costs.communication_bytes(full_param_bytes, shape, model_cfg, tr.global_batch_size, tr.grad_accum_steps)
    model_flops = train_flops_per_image(model_cfg) * tr.global_batch_size
    compute_s = flops_dev / chip.peak_flops
    comm_s = costs.communication_seconds(comm, chip, shape)
    step_s = max(compute_s, comm_s or 0.0)
    warnings = []
    if comm_s is None:
        warnings.append(f"{n} {chip.name} chips exceed one {chip.island}-chip interconnect island; the "
                        "scale-out network is not modelled, so communication time is left out")
    unsharded, unsharded_fraction = replicated_params(state, mesh)
    if unsharded_fraction > 0.01:
        warnings.append(f"{100 * unsharded_fraction:.0f}% of the parameters are replicated: no mesh axis divides "
                        f"any of their dimensions (largest: {unsharded[0]}); try data=K,fsdp=N/K")
    return {
        "config": {"mesh": {a: shape[a] for a in MESH_AXES}, "rules": config.mesh.rules,
                   "custom_rules": config.mesh.custom_rules, "rule_list": format_rules(rules), "devices": n,
                   "chip": chip.name,
                   "global_batch_size": tr.global_batch_size, "grad_accum_steps": tr.grad_accum_steps,
                   "model": dataclasses.asdict(model_cfg)},
        "num_params": int(sum(math.prod(s.shape) for s in jax.tree.leaves(state.params))),
        "per_device_memory_bytes": memory,
        "hbm_bytes": chip.hbm_bytes,
        "fits": memory["total"] <= chip.hbm_bytes,
        "hbm_fraction": memory["total"] / chip.hbm_bytes,
        "flops_per_step": flops_dev * n,
        "model_flops_per_step": model_flops,
        "flops_ratio": flops_dev * n / model_flops,
        "xla_bytes_accessed_per_device": bytes_dev,
        "communication_bytes_per_device": comm,
        "est_step_time_s": step_s,
        "est_step_time_breakdown_s": {"compute": compute_s, "communication": comm_s,
                                      "hbm_cpu_estimate": bytes_dev / chip.hbm_bandwidth},
        "est_mfu": model_flops / (n * chip.peak_flops * step_s),
        "compile_seconds": compile_s,
        "plan_seconds": plan_s,
        "replicated_params": unsharded,
        "replicated_param_fraction": unsharded_fraction,
        "warnings": warnings,
    }


def apply_mesh(config: ml_collections.ConfigDict, mesh: str, rules: str) -> None:
    """``--mesh fsdp=64[,data=4,…]`` sets the in-slice sizes (unnamed axes 1); ``--rules auto`` picks the
    preset the mesh implies (tensor → fsdp_tp, fsdp → fsdp, else dp)."""
    sizes = {a: 1 for a in MESH_AXES}
    for item in filter(None, mesh.split(",")):
        axis, _, value = item.partition("=")
        if axis.strip() not in MESH_AXES:
            raise ConfigError(f"--mesh {mesh!r}: unknown axis {axis!r}; axes: {', '.join(MESH_AXES)}")
        sizes[axis.strip()] = int(value)
    config.mesh.update(sizes)
    if rules == "auto":
        rules = "fsdp_tp" if sizes["tensor"] > 1 else "fsdp" if sizes["fsdp"] > 1 else "dp"
    config.mesh.rules = rules


def summary(report: dict[str, Any]) -> str:
    gib = 2**30
    m, c = report["per_device_memory_bytes"], report["config"]
    mesh = ",".join(f"{a}={s}" for a, s in c["mesh"].items() if s > 1) or "1 device"
    t = report["est_step_time_breakdown_s"]
    comm = "not modelled" if t["communication"] is None else f"{t['communication'] * 1e3:.1f} ms"
    lines = [
        f"{c['devices']} × {c['chip']}, mesh {mesh}, rules {c['rules']} {c['custom_rules']}".rstrip(),
        f"params {report['num_params'] / 1e6:.1f}M, global batch {c['global_batch_size']}",
        f"per device: params {m['parameters'] / gib:.3f} GiB, EMA {m['ema'] / gib:.3f} GiB, optimizer "
        f"{m['optimizer_state'] / gib:.3f} GiB, temporaries {m['temporaries'] / gib:.3f} GiB → total "
        f"{m['total'] / gib:.2f} GiB of {report['hbm_bytes'] / gib:.1f} GiB: "
        f"{'fits' if report['fits'] else 'DOES NOT FIT'}",
        f"FLOPs/step {report['flops_per_step']:.3e} (XLA) vs {report['model_flops_per_step']:.3e} (model), "
        f"ratio {report['flops_ratio']:.3f}",
        f"step ≥ {report['est_step_time_s'] * 1e3:.1f} ms (compute {t['compute'] * 1e3:.1f} ms, communication "
        f"{comm}) → MFU ≤ {100 * report['est_mfu']:.1f}%",
        f"step compiled in {report['compile_seconds']:.1f} s, planned in {report['plan_seconds']:.1f} s",
        *(f"warning: {w}" for w in report["warnings"]),
    ]
    return "\n".join(lines)


_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:ARG]).", lock_config=False)
_DEVICES = flags.DEFINE_integer("devices", None, "Number of simulated devices.", lower_bound=1)
_MESH = flags.DEFINE_string("mesh", None, "Mesh sizes, e.g. fsdp=64 or data=4,fsdp=64 (default: config.mesh).")
_RULES = flags.DEFINE_string("rules", "auto", "Rule preset, or 'auto' to infer it from --mesh.")
_CHIP = flags.DEFINE_enum("chip", "v5e", list(CHIPS), "Chip for memory capacity and the roofline.")
_JSON = flags.DEFINE_string("json", None, "Also write the report as JSON here.")
flags.mark_flags_as_required(["config", "devices"])


def main(argv: list[str]) -> int:
    del argv
    if jax.device_count() != _DEVICES.value:
        raise SystemExit(f"asked for {_DEVICES.value} devices but jax sees {jax.device_count()}; run this as "
                         "`python -m ditjax.plan` so it can set XLA_FLAGS before jax starts")
    config = _CONFIG.value
    try:
        if _MESH.value:
            apply_mesh(config, _MESH.value, _RULES.value)
        elif _RULES.value != "auto":
            config.mesh.rules = _RULES.value
        validate(config, num_devices=_DEVICES.value, check_data=False)
    except (ConfigError, ValueError) as err:
        logging.error("invalid config: %s", err)
        return 2
    report = plan(config, get_chip(_CHIP.value))
    print(summary(report))
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(report, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    app.run(main)
