"""The one train step: loss, gradients (optionally accumulated), AdamW, EMA, NaN/Inf guard.

Everything a later feature adds to the loss goes through ``aux_losses``: functions of the model's
:class:`ModelOutput` and the batch returning (weighted loss, metrics). MoE load-balancing losses come
from the model itself (``ModelOutput.aux_loss``).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from ditjax.generate import Objective
from ditjax.models import ModelOutput
from ditjax.parallel.logical import axis_rules
from ditjax.parallel.mesh import batch_sharding, replicated
from ditjax.train.state import TrainState

AuxLoss = Callable[[ModelOutput, dict, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def merge_params(graphdef: nnx.GraphDef, abstract_state: nnx.State, params: dict) -> nnx.Module:
    state = jax.tree.map(lambda v: v, abstract_state)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def ema_decay_at(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
    """Constant decay, or min(decay, (1+n)/(10+n)) so short runs are not dominated by the init."""
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    n = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def make_train_step(graphdef: nnx.GraphDef, abstract_state: nnx.State, objective: Objective,
                    tx: optax.GradientTransformation, schedule: optax.Schedule, train_cfg: Any, mesh: Mesh,
                    rules: list, shardings: TrainState, aux_losses: Sequence[AuxLoss] = (),
                    capture_hidden: Sequence[int] = (), capture_logits: Sequence[int] = ()):
    """A jitted (state, batch) → (state, metrics) with the state donated."""
    accum = train_cfg.grad_accum_steps

    def loss_fn(params: dict, batch: dict, key: jax.Array):
        model = merge_params(graphdef, abstract_state, params)
        drop_key, objective_key, aux_key = jax.random.split(key, 3)
        captured: list[ModelOutput] = []

        def model_fn(x, t, y):
            out = model(x, t, y, label_drop_key=drop_key, capture_hidden=capture_hidden,
                        capture_logits=capture_logits)
            captured.append(out)
            return out.output

        losses = objective.losses(model_fn, batch["image"], batch["label"], objective_key)
        metrics = {name: value.mean() for name, value in losses.items()}
        loss = metrics["loss"] + captured[0].aux_loss
        for aux in aux_losses:
            aux_value, aux_metrics = aux(captured[0], batch, aux_key)
            loss, metrics = loss + aux_value, {**metrics, **aux_metrics}
        metrics["loss"] = loss
        return loss, metrics

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(state.rng, state.step)
        if accum == 1:
            (_, metrics), grads = grad_fn(state.params, batch, key)
        else:
            micro = jax.tree.map(lambda a: a.reshape((accum, a.shape[0] // accum) + a.shape[1:]), batch)

            def body(carry, inputs):
                i, mb = inputs
                (_, m), g = grad_fn(state.params, mb, jax.random.fold_in(key, i))
                return jax.tree.map(jnp.add, carry, (g, m)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            shapes = jax.eval_shape(lambda: grad_fn(state.params, jax.tree.map(lambda a: a[0], micro), key)[0][1])
            init = (zeros, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))
            (grads, metrics), _ = jax.lax.scan(body, init, (jnp.arange(accum), micro))
            grads, metrics = jax.tree.map(lambda a: a / accum, (grads, metrics))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay_at(state.step, train_cfg.ema_decay, train_cfg.ema_warmup)
        ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema, params)
        grad_norm = optax.tree.norm(grads)
        new = TrainState(step=state.step + 1, params=params, ema=ema, opt_state=opt_state, rng=state.rng)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        if train_cfg.nan_guard:  # a non-finite step leaves the state untouched; the loop then stops
            new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        metrics = {**metrics, "grad_norm": grad_norm, "lr": schedule(state.step), "finite": finite}
        return new, metrics

    data_sharding = {"image": batch_sharding(mesh, rules, 4), "label": batch_sharding(mesh, rules, 1)}

    def traced(state, batch):
        with axis_rules(mesh, rules):
            return step(state, batch)

    return jax.jit(traced, in_shardings=(shardings, data_sharding), out_shardings=(shardings, replicated(mesh)),
                   donate_argnums=(0,)), data_sharding
