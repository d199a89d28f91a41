"""Optimizer: optax AdamW with schedules, clipping, and per-parameter multipliers.

Per-parameter learning-rate and weight-decay multipliers (μP's MuAdamW rules) are pytrees shaped
like the parameters and are applied inside a single optax chain, so there is one optimizer state.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ("constant", "warmup_constant", "cosine", "warmup_cosine")


def learning_rate_schedule(cfg: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """Peak ``cfg.lr``; warm-up over ``cfg.warmup_steps``; cosine decays to ``cfg.end_lr`` at ``num_steps``."""
    warmup = cfg.warmup_steps if cfg.schedule.startswith("warmup") else 0
    if cfg.schedule in ("constant", "warmup_constant"):
        after = optax.constant_schedule(cfg.lr)
    elif cfg.schedule in ("cosine", "warmup_cosine"):
        after = optax.cosine_decay_schedule(cfg.lr, max(num_steps - warmup, 1), alpha=cfg.end_lr / cfg.lr)
    else:
        raise ValueError(f"optim.schedule={cfg.schedule!r} not in {SCHEDULES}")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def scale_by_tree(multipliers: Any) -> optax.GradientTransformation:
    """Multiply each update by a fixed per-parameter factor (a pytree matching the parameters)."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, multipliers), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: ml_collections.ConfigDict, num_steps: int, *, lr_multipliers: Any = None,
                   wd_multipliers: Any = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW as torch defines it (decoupled decay lr·wd·θ), with optional per-parameter multipliers.

    μP's MuAdamW scales a hidden weight's lr by 1/m and its weight decay by m, keeping lr·wd fixed:
    here the decay term is scaled by ``wd_multipliers`` before the shared lr·multiplier scaling.
    """
    schedule = learning_rate_schedule(cfg, num_steps)
    chain = []
    if cfg.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(cfg.grad_clip))
    chain.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
    if cfg.weight_decay > 0:
        decay = optax.add_decayed_weights(cfg.weight_decay)
        if wd_multipliers is not None:
            decay = _scaled_decay(cfg.weight_decay, wd_multipliers)
        chain.append(decay)
    if lr_multipliers is not None:
        chain.append(scale_by_tree(lr_multipliers))
    chain.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*chain), schedule


def _scaled_decay(weight_decay: float, wd_multipliers: Any) -> optax.GradientTransformation:
    def update(updates, state, params):
        return jax.tree.map(lambda u, p, m: u + weight_decay * m * p, updates, params, wd_multipliers), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
