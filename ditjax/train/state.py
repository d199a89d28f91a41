"""Train state: parameters, EMA, optimizer state, step and base RNG, created directly in their shardings."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from ditjax.models import DiT, DiTConfig
from ditjax.parallel.mesh import param_shardings, replicated

ParamsInit = Callable[[dict, jax.Array], dict]


@struct.dataclass
class TrainState:
    step: jax.Array        # int32 scalar: optimizer steps taken
    params: dict           # pure dict of arrays (nnx.to_pure_dict layout)
    ema: dict
    opt_state: Any
    rng: jax.Array         # uint32[2] base key; step k uses fold_in(rng, k), so resume is exact

    def to_checkpoint(self) -> dict:
        return {"step": self.step, "params": self.params, "ema": self.ema, "opt_state": self.opt_state,
                "rng": self.rng}

    @classmethod
    def from_checkpoint(cls, tree: dict) -> TrainState:
        return cls(**tree)


def abstract_model(model_cfg: DiTConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and parameter shapes, without allocating any parameter."""
    model = nnx.eval_shape(lambda: DiT(model_cfg, rngs=nnx.Rngs(0)))
    return nnx.split(model)


def state_shardings(abstract_state: nnx.State, abstract_train_state: TrainState, tx: optax.GradientTransformation,
                    mesh: Mesh, rules: list) -> TrainState:
    """Shardings for every leaf: optimizer moments follow their parameters, scalars are replicated."""
    p = param_shardings(abstract_state, mesh, rules)
    opt = optax.tree_map_params(tx, lambda _, s: s, abstract_train_state.opt_state, p,
                                transform_non_params=lambda _: replicated(mesh))
    return TrainState(step=replicated(mesh), params=p, ema=p, opt_state=opt, rng=replicated(mesh))


def init_train_state(model_cfg: DiTConfig, tx: optax.GradientTransformation, seed: int, mesh: Mesh, rules: list,
                     params_init: ParamsInit | None = None) -> tuple[TrainState, TrainState]:
    """(state, shardings). Each device materialises only its shard: init runs under jit with out_shardings.

    ``params_init`` rewrites the reference initialisation (μP uses it for its own init rules).
    """
    _, abstract_state = abstract_model(model_cfg)

    def init() -> TrainState:
        key = jax.random.PRNGKey(seed)
        model_key, init_key, rng = jax.random.split(key, 3)
        params = nnx.to_pure_dict(nnx.state(DiT(model_cfg, rngs=nnx.Rngs(model_key))))
        if params_init is not None:
            params = params_init(params, init_key)
        ema = jax.tree.map(lambda a: a + jnp.zeros_like(a), params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema=ema, opt_state=tx.init(params), rng=rng)

    abstract = jax.eval_shape(init)
    shardings = state_shardings(abstract_state, abstract, tx, mesh, rules)
    return jax.jit(init, out_shardings=shardings)(), shardings


def abstract_train_state(model_cfg: DiTConfig, tx: optax.GradientTransformation, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs with shardings: the restore target, so checkpoints load onto any mesh."""
    _, abstract_state = abstract_model(model_cfg)
    params = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(abstract_state))
    shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, ema=params,
                        opt_state=jax.eval_shape(tx.init, params), rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
