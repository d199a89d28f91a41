"""The training loop: validate, build, restore, step, log, checkpoint, sample, evaluate.

Re-running the same command resumes from the latest readable checkpoint with exactly the next batch
and RNG, so a killed run ends bitwise equal to an uninterrupted one (on the same device count).
SIGTERM (preemption) saves a checkpoint and exits cleanly.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx

from ditjax import checkpoint as ckpt_lib
from ditjax import mup
from ditjax.config import model_config, validate
from ditjax.data.pipeline import make_train_iterator
from ditjax.generate import generate, make_objective, param_template, save_grid
from ditjax.parallel.mesh import gather_to_host, make_mesh, resolve_rules
from ditjax.train.errors import NonFiniteLossError
from ditjax.train.metrics import MetricWriter, peak_flops_per_device, train_flops_per_image
from ditjax.train.optim import make_optimizer
from ditjax.train.state import TrainState, abstract_model, abstract_train_state, init_train_state
from ditjax.train.step import make_train_step

log = logging.getLogger("ditjax.train")


class _Preemption:
    """Turns SIGTERM into a flag the loop polls, so it can save before exiting."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        log.warning("SIGTERM received: saving a checkpoint and exiting")
        self.requested = True

    def agreed(self) -> bool:
        """Every process must stop at the same step; multi-host runs agree through a tiny all-gather."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils
        return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def _global_batch(local: dict, shardings: dict) -> dict:
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in local.items()}


def _format(step: int, num_steps: int, m: dict[str, float]) -> str:
    eta = (num_steps - step) / max(m["steps_per_s"], 1e-9)
    parts = [f"step {step}/{num_steps}", f"loss {m['loss']:.4f}", f"grad_norm {m['grad_norm']:.3f}",
             f"lr {m['lr']:.2e}", f"{m['img_per_s']:.1f} img/s", f"MFU {100 * m['mfu']:.1f}%",
             f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}"]
    return " | ".join(parts)


def _sample_grid(workdir: Path, name: str, run_config: dict, graphdef, template, ema: dict, seed: int) -> Path:
    s = run_config["sample"]
    classes = min(s["grid_classes"], run_config["model"]["num_classes"])
    labels = np.repeat(np.arange(classes), s["grid_per_class"]).astype(np.int32)
    m = run_config["model"]
    rng = np.random.default_rng(seed)  # fixed noise and labels: grids are comparable across steps
    noise = rng.standard_normal((len(labels), m["input_size"], m["input_size"], m["in_channels"])).astype(np.float32)
    images = generate(graphdef, template, jax.device_get(ema), run_config, labels, noise, jax.random.PRNGKey(seed))
    path = workdir / "samples" / f"{name}.png"
    if run_config["model"]["in_channels"] not in (1, 3):  # latent models without a decoder: keep the latents
        path = path.with_suffix(".npy")
    if jax.process_index() == 0:  # every process samples (same result), one writes
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".png":
            save_grid(images, str(path), columns=s["grid_per_class"])
        else:
            np.save(path, images.transpose(0, 3, 1, 2))
    return path


def evaluate_digits(workdir: Path, run_config: dict, graphdef, template, params: dict, seed: int,
                    weights: str = "ema") -> dict:
    """Class accuracy and Fréchet distance of samples on the bundled digits → eval.json, with the
    settings that produced them (``weights`` names which parameters ``params`` are)."""
    from ditjax.eval.digits import evaluate_digit_samples

    s, m = run_config["sample"], run_config["model"]
    n = s["eval_samples"]
    labels = (np.arange(n) % m["num_classes"]).astype(np.int32)
    noise = np.random.default_rng(seed + 1).standard_normal(
        (n, m["input_size"], m["input_size"], m["in_channels"])).astype(np.float32)
    t0 = time.perf_counter()
    images = generate(graphdef, template, jax.device_get(params), run_config, labels, noise,
                      jax.random.PRNGKey(seed + 1))
    result = evaluate_digit_samples(images, labels)
    result["seconds"] = time.perf_counter() - t0  # sampling, plus the classifier's fit if it was not cached
    result["settings"] = {"weights": weights, "samples": n, "seed": seed,
                          **{k: s[k] for k in ("sampler", "steps", "cfg_scale", "cfg_channels")}}
    result = {k: (v if not isinstance(v, dict) else {str(a): b for a, b in v.items()}) for k, v in result.items()}
    if jax.process_index() == 0:
        (workdir / "eval.json").write_text(json.dumps(result, indent=2))
    return result


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Train ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the final metrics."""
    workdir = Path(workdir)
    validate(config, num_devices=jax.device_count(), num_processes=jax.process_count())
    run_config = config.to_dict()
    plan = mup.plan_for(config, model_config(config))  # μP: model fields, init, lr/wd multipliers (SP: none)
    model_cfg = plan.model_cfg
    run_config["model"].update(plan.model_overrides)
    tr = config.train
    mesh, rules = make_mesh(config.mesh), resolve_rules(config.mesh)
    objective = make_objective(run_config["objective"], model_cfg.learn_sigma)
    tx, schedule = make_optimizer(config.optim, tr.num_steps, lr_multipliers=plan.lr_multipliers,
                                  wd_multipliers=plan.wd_multipliers)

    state, shardings = init_train_state(model_cfg, tx, config.seed, mesh, rules, params_init=plan.params_init)
    manager = ckpt_lib.CheckpointManager(workdir, keep_last=tr.keep_last, keep_every=tr.keep_every or None,
                                         async_save=tr.async_checkpoint)
    data = make_train_iterator(config.data, global_batch_size=tr.global_batch_size, seed=config.seed,
                               process_index=jax.process_index(), process_count=jax.process_count())
    restored = manager.restore_latest_good(abstract_train_state(model_cfg, tx, shardings).to_checkpoint())
    if restored is not None:
        step0, tree, data_state = restored
        state = TrainState.from_checkpoint(tree)
        if data_state:
            data.set_state(data_state)
        log.info("resumed from step %d in %s", step0, workdir)
    ckpt_lib.write_config(workdir, run_config)

    graphdef, abstract_state = abstract_model(model_cfg)
    step_fn, data_sharding = make_train_step(graphdef, abstract_state, objective, tx, schedule, tr, mesh, rules,
                                             shardings)
    template = param_template(abstract_state)

    flops_per_img = train_flops_per_image(model_cfg)
    peak, peak_source = peak_flops_per_device(model_cfg.dtype)
    log.info("DiT depth %d, width %d, %d heads, patch %d: %.2fM parameters, %.2f GFLOP per image per step; "
             "peak %.1f GFLOP/s per device (%s); %d devices, mesh %s", model_cfg.depth, model_cfg.hidden_size,
             model_cfg.num_heads, model_cfg.patch_size,
             sum(np.prod(x.shape) for x in jax.tree.leaves(state.params)) / 1e6, flops_per_img / 1e9,
             peak / 1e9, peak_source, jax.device_count(), dict(mesh.shape))
    writer = MetricWriter(workdir)
    preemption = _Preemption()
    step = int(jax.device_get(state.step))
    last_time, last_step, history, compiled = time.perf_counter(), step, [], False
    final = {}
    try:
        while step < tr.num_steps:
            batch = _global_batch(next(data), data_sharding)
            state, metrics = step_fn(state, batch)
            step += 1
            if not compiled:  # throughput is timed from here, so it excludes compilation
                jax.block_until_ready(state)
                log.info("first step (trace + compile + run) took %.1f s", time.perf_counter() - last_time)
                compiled, last_time, last_step = True, time.perf_counter(), step
            if (step % tr.log_every == 0 or step == tr.num_steps) and step > last_step:
                metrics = jax.device_get(metrics)
                if not metrics.pop("finite"):
                    raise NonFiniteLossError(
                        f"non-finite loss or gradient at step {step} (loss {metrics['loss']}, grad_norm "
                        f"{metrics['grad_norm']}); the state was not updated and the last good checkpoint "
                        f"(step {manager.latest_step()}) is kept. Lower optim.lr, set optim.grad_clip, or check "
                        "the data.")
                now = time.perf_counter()
                steps_per_s = (step - last_step) / (now - last_time)
                img_per_s = steps_per_s * tr.global_batch_size
                metrics = {k: float(v) for k, v in metrics.items()}
                metrics.update(steps_per_s=steps_per_s, img_per_s=img_per_s,
                               mfu=img_per_s * flops_per_img / (peak * jax.device_count()))
                last_time, last_step = now, step
                history.append(metrics["loss"])
                writer.write(step, metrics)
                log.info(_format(step, tr.num_steps, metrics))
            # Multi-host agreement is a collective: ask only at log steps so pods don't sync every step.
            stop = preemption.agreed() if jax.process_count() == 1 or step % tr.log_every == 0 else False
            if step % tr.checkpoint_every == 0 or step == tr.num_steps or stop:
                manager.save(step, state.to_checkpoint(), data.get_state(), force=stop)
            if tr.sample_every and step % tr.sample_every == 0 and step < tr.num_steps:
                path = _sample_grid(workdir, f"step_{step:07d}", run_config, graphdef, template,
                                    gather_to_host(state.ema, mesh), config.seed)
                log.info("sample grid: %s", path)
            if stop:
                manager.wait()
                log.info("preempted: checkpoint of step %d saved in %s", step, workdir)
                return {"step": step, "preempted": True}
        manager.wait()
        final = {"step": step, "final_loss": float(np.mean(history[-5:])) if history else float("nan")}
        ema = gather_to_host(state.ema, mesh)  # FSDP across hosts: no process holds the whole EMA
        grid = _sample_grid(workdir, "final", run_config, graphdef, template, ema, config.seed)
        final["sample_grid"] = str(grid)
        if tr.eval_at_end and config.data.name == "digits":
            final.update(evaluate_digits(workdir, run_config, graphdef, template, ema, config.seed))
            log.info("eval: class_accuracy %.4f | frechet_distance %.2f | frechet_distance_real_halves %.2f",
                     final["class_accuracy"], final["frechet_distance"], final["frechet_distance_real_halves"])
        log.info("sample grid: %s", grid)
        if jax.process_index() == 0:
            (workdir / "final_metrics.json").write_text(json.dumps(final, indent=2))
        return final
    finally:
        preemption.restore()
        writer.close()
        manager.close()
