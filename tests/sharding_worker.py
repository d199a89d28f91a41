"""Run by tests/test_sharding.py on 8 simulated CPU devices: python tests/sharding_worker.py OUT.json TMPDIR

Trains the tiny config for STEPS steps on one device and on 8 devices with each rule preset, through the
trainer's own pieces (init in shardings, jitted step, batches assembled with
make_array_from_process_local_data) under ``jax.transfer_guard_device_to_host("disallow")``, so any
implicit copy of device data to the host (a host gather of the state) fails the run. Then saves the FSDP
state and restores it onto data=2,fsdp=4 and onto one device, and runs a per-shard kernel through
``shard_over_mesh``. Writes what the tests assert on as JSON.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

from configs.default import get_config
from ditjax.checkpoint import CheckpointManager
from ditjax.config import model_config
from ditjax.data.pipeline import make_train_iterator
from ditjax.generate import make_objective
from ditjax.parallel.costs import param_bytes_per_device
from ditjax.parallel.logical import axis_rules, shard_over_mesh
from ditjax.parallel.mesh import make_mesh, resolve_rules
from ditjax.plan import abstract_sharded_state
from ditjax.train.optim import make_optimizer
from ditjax.train.state import TrainState, abstract_model, init_train_state
from ditjax.train.step import make_train_step
from multidevice import STEPS, TINY

RUNS = {  # name: (mesh sizes, rule preset, use only the first device)
    "single": ({"data": 1, "fsdp": 1, "tensor": 1}, "dp", True),
    "dp": ({"data": 8, "fsdp": 1, "tensor": 1}, "dp", False),
    "fsdp": ({"data": 1, "fsdp": 8, "tensor": 1}, "fsdp", False),
    "fsdp_tp": ({"data": 1, "fsdp": 4, "tensor": 2}, "fsdp_tp", False),
}
SPEC_PARAMS = {
    "qkv": ("blocks", 0, "attn", "qkv", "kernel"), "proj": ("blocks", 0, "attn", "proj", "kernel"),
    "fc1": ("blocks", 0, "mlp", "fc1", "kernel"), "fc2": ("blocks", 0, "mlp", "fc2", "kernel"),
    "adaln": ("blocks", 0, "modulation", "kernel"), "embedding_table": ("y_embedder", "embedding_table"),
}


def config_for(mesh: dict, rules: str) -> ml_collections.ConfigDict:
    config = get_config()
    config.update_from_flattened_dict(TINY)
    config.mesh.update(mesh)
    config.mesh.rules = rules
    return config


def pick(tree: dict, path: tuple) -> jax.Array:
    for key in path:
        tree = tree[key]
    return tree


def train(config: ml_collections.ConfigDict, devices: list) -> dict:
    mesh, rules = make_mesh(config.mesh, devices), resolve_rules(config.mesh)
    model_cfg = model_config(config)
    tx, schedule = make_optimizer(config.optim, config.train.num_steps)
    graphdef, abstract_state = abstract_model(model_cfg)
    losses = []
    with jax.transfer_guard_device_to_host("disallow"):  # only the explicit loss fetch may leave the devices
        state, shardings = init_train_state(model_cfg, tx, config.seed, mesh, rules)
        step_fn, data_sharding = make_train_step(graphdef, abstract_state,
                                                 make_objective(config.objective.to_dict(), model_cfg.learn_sigma),
                                                 tx, schedule, config.train, mesh, rules, shardings)
        data = make_train_iterator(config.data, global_batch_size=config.train.global_batch_size, seed=config.seed)
        for _ in range(STEPS):
            batch = {k: jax.make_array_from_process_local_data(data_sharding[k], np.asarray(v))
                     for k, v in next(data).items()}
            state, metrics = step_fn(state, batch)
            losses.append(float(jax.device_get(metrics["loss"])))
    device0 = mesh.devices.flat[0]
    held = sum(s.data.nbytes for leaf in jax.tree.leaves(state.params) for s in leaf.addressable_shards
               if s.device == device0)
    return {"losses": losses, "specs": {k: str(pick(state.params, p).sharding.spec) for k, p in SPEC_PARAMS.items()},
            "param_bytes_device0": held,
            "param_bytes_analytic": param_bytes_per_device(abstract_state, rules, dict(mesh.shape)),
            "state": state, "tx": tx, "model_cfg": model_cfg}


def reshard(workdir: Path, fsdp_run: dict) -> dict:
    """Save the FSDP-8 state, restore it on other meshes, compare every value."""
    manager = CheckpointManager(workdir, keep_last=1, async_save=False)
    manager.save(STEPS, fsdp_run["state"].to_checkpoint(), {"next_index": STEPS}, force=True)
    manager.wait()
    saved = jax.tree.leaves(jax.device_get(fsdp_run["state"].to_checkpoint()))
    out = {}
    for name, (mesh_sizes, devices) in {"data2_fsdp4": ({"data": 2, "fsdp": 4}, None),
                                        "one_device": ({"data": 1, "fsdp": 1}, jax.devices()[:1])}.items():
        config = config_for({**mesh_sizes, "tensor": 1}, "fsdp")
        mesh, rules = make_mesh(config.mesh, devices), resolve_rules(config.mesh)
        target = abstract_sharded_state(fsdp_run["model_cfg"], fsdp_run["tx"], mesh, rules)
        tree, data_state = manager.restore(STEPS, target.to_checkpoint())
        restored = TrainState.from_checkpoint(tree)
        qkv = pick(restored.params, SPEC_PARAMS["qkv"])
        out[name] = {"equal": all(np.array_equal(a, b) for a, b in zip(saved, jax.tree.leaves(jax.device_get(tree)))),
                     "qkv_spec": str(qkv.sharding.spec), "mesh": dict(qkv.sharding.mesh.shape),
                     "data_state": data_state}
    manager.close()
    return out


def per_shard_kernel() -> dict:
    """A kernel XLA must not partition (like Pallas attention) sees only its shard of q, k, v."""
    config = config_for({"data": 1, "fsdp": 4, "tensor": 2}, "fsdp_tp")
    mesh, rules = make_mesh(config.mesh), resolve_rules(config.mesh)
    seen = []

    def kernel(q, k, v):
        seen.append(q.shape)
        return q * k + v

    def attention_like(q, k, v):
        with axis_rules(mesh, rules):
            return shard_over_mesh(kernel, ("batch", "tokens", "heads", "head_dim"))(q, k, v)

    q, k, v = (np.random.default_rng(i).standard_normal((16, 8, 2, 4)).astype(np.float32) for i in range(3))
    out = jax.jit(attention_like)(q, k, v)
    return {"local_shape": list(seen[0]), "equal": bool(np.allclose(jax.device_get(out), q * k + v))}


def main(out_path: str, workdir: str) -> None:
    results: dict = {"runs": {}, "seconds": {}}
    runs = {}
    for name, (mesh, rules, first_only) in RUNS.items():
        t0 = time.perf_counter()
        runs[name] = train(config_for(mesh, rules), jax.devices()[:1] if first_only else jax.devices())
        results["runs"][name] = {k: v for k, v in runs[name].items() if k not in ("state", "tx", "model_cfg")}
        results["seconds"][name] = time.perf_counter() - t0
    t0 = time.perf_counter()
    results["reshard"] = reshard(Path(workdir) / "ckpt", runs["fsdp"])
    results["seconds"]["reshard"] = time.perf_counter() - t0
    results["shard_over_mesh"] = per_shard_kernel()
    Path(out_path).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:])
