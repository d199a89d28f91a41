"""Coordinate check: does every activation's size stay put as width grows (μP) or blow up (SP)?

For each parametrization and width we train a few steps from the same data, recording before each
update the mean |x| of the patch embedding, the conditioning vector, each block's attention and MLP
branch and output, and the model's output (mup's ``get_coord_data`` with ``l1`` statistics). Under μP each curve against width is
flat; under SP with Adam, hidden activations grow ~linearly in width once the weights have moved.
The summary is the slope of log mean|x| vs log width at the last step.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from ditjax.config import model_config
from ditjax.generate import make_objective
from ditjax.models import DiT
from ditjax.mup.plan import plan_for
from ditjax.train.optim import make_optimizer

# coords[parametrization][layer][step] = [mean|x| at each width]
Coords = dict[str, dict[str, list[list[float]]]]


def width_config(config: ml_collections.ConfigDict, width: int, parametrization: str) -> ml_collections.ConfigDict:
    """The config at ``width`` with heads grown at the base head dim (DiT-μP's scheme)."""
    head_dim = config.mup.base_hidden_size // config.mup.base_num_heads
    if width % head_dim:
        raise ValueError(f"width {width} is not a multiple of the base head dim {head_dim}")
    c = ml_collections.ConfigDict(config.to_dict())
    c.model.update(hidden_size=width, num_heads=width // head_dim, scan_layers=False)  # blocks tapped one by one
    c.mup.parametrization = parametrization
    return c


class _Tap(nnx.Module):
    """Forward hook: calls ``inner`` and hands its (first) output to ``record`` under ``name``."""

    def __init__(self, inner: nnx.Module, name: str, record: Callable[[str, jax.Array], None]):
        self.inner, self.name, self.record = inner, name, record

    def __call__(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        self.record(self.name, out[0] if isinstance(out, tuple) else out)
        return out


def _activations(model: DiT, x: jax.Array, t: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
    """mean|x| of the embeddings, each block's attention and MLP branch and output, and the model output."""
    acts: dict[str, jax.Array] = {}
    for i, block in enumerate(model.blocks):
        block.attn = _Tap(block.attn, f"block{i}.attn", lambda k, v: acts.__setitem__(k, v))
        block.mlp = _Tap(block.mlp, f"block{i}.mlp", lambda k, v: acts.__setitem__(k, v))
    depth = model.cfg.depth
    out = model(x, t, y, capture_hidden=range(depth))
    acts.update({"embed": model.x_embedder(x), "cond": model.t_embedder(t) + model.y_embedder(y)})
    acts.update({f"block{i}.out": out.hidden[i] for i in range(depth)})
    acts["output"] = out.output
    return {k: jnp.abs(v).mean() for k, v in sorted(acts.items())}


def record_width(config: ml_collections.ConfigDict, batches: Sequence[dict], seed: int) -> dict[str, list[float]]:
    """mean|x| per layer before each of ``len(batches)`` Adam steps, for one config."""
    plan = plan_for(config, model_config(config))
    model_cfg = plan.model_cfg
    tx, _ = make_optimizer(config.optim, len(batches), lr_multipliers=plan.lr_multipliers,
                           wd_multipliers=plan.wd_multipliers)
    model_key, init_key = jax.random.split(jax.random.PRNGKey(seed))
    model = DiT(model_cfg, rngs=nnx.Rngs(model_key))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    if plan.params_init is not None:
        params = plan.params_init(params, init_key)
    objective = make_objective(config.objective.to_dict(), model_cfg.learn_sigma)

    def merged(p: dict) -> DiT:
        s = jax.tree.map(lambda v: v, state)
        nnx.replace_by_pure_dict(s, p)
        return nnx.merge(graphdef, s)

    @jax.jit
    def step(p, opt_state, batch, key):
        def loss_fn(p):
            model = merged(p)
            return objective.losses(lambda x, t, y: model(x, t, y).output, batch["image"], batch["label"],
                                    key)["loss"].mean()

        t = jnp.full((batch["image"].shape[0],), 0.5 * config.objective.time_scale, jnp.float32)
        stats = _activations(merged(p), batch["image"], t, batch["label"])
        grads = jax.grad(loss_fn)(p)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, stats

    opt_state = tx.init(params)
    history: dict[str, list[float]] = {}
    for i, batch in enumerate(batches):
        params, opt_state, stats = step(params, opt_state, batch, jax.random.PRNGKey(1000 + i))
        for k, v in stats.items():
            history.setdefault(k, []).append(float(v))
    return history


def coord_check(config: ml_collections.ConfigDict, widths: Sequence[int], batches: Sequence[dict],
                seed: int = 0) -> Coords:
    """Coordinates of both parametrizations at every width, from identical data and noise."""
    coords: Coords = {}
    for param in ("sp", "mup"):
        per_width = [record_width(width_config(config, w, param), batches, seed) for w in widths]
        coords[param] = {layer: [[h[layer][s] for h in per_width] for s in range(len(batches))]
                         for layer in per_width[0]}
    return coords


def slopes(coords: Coords, widths: Sequence[int]) -> dict[str, dict[str, float]]:
    """Least-squares slope of log mean|x| vs log width at the last step, per parametrization and layer."""
    logw = np.log(np.asarray(widths, np.float64))
    return {param: {layer: float(np.polyfit(logw, np.log(np.maximum(steps[-1], 1e-30)), 1)[0])
                    for layer, steps in layers.items()}
            for param, layers in coords.items()}


def data_batches(config: ml_collections.ConfigDict, batch_size: int, steps: int) -> list[dict]:
    """The first ``steps`` training batches of the config's data, shared by every width."""
    from ditjax.data.pipeline import make_train_iterator

    it: Iterator = make_train_iterator(config.data, global_batch_size=batch_size, seed=config.seed)
    return [{k: jnp.asarray(np.asarray(v)) for k, v in next(it).items()} for _ in range(steps)]


def plot(coords: Coords, widths: Sequence[int], path: str) -> None:
    """One panel per parametrization: mean|x| vs width (log-log), a colour per layer, darker = later step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(coords), figsize=(5.5 * len(coords), 4.2), sharey=True, squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, (param, layers) in zip(axes[0], coords.items()):
        for j, (layer, steps) in enumerate(layers.items()):
            for s, values in enumerate(steps):
                ax.plot(widths, values, marker="o", markersize=3, color=cmap(j % 10),
                        alpha=0.3 + 0.7 * (s + 1) / len(steps), label=layer if s == len(steps) - 1 else None)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{param}: mean |activation| (steps 1..{len(next(iter(layers.values())))})")
        ax.set_xlabel("width")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean |x|")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def lr_config(config: ml_collections.ConfigDict, lr: float) -> ml_collections.ConfigDict:
    """Constant lr, no clipping or decay: the check measures the raw update size at ``lr``."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.optim.update(lr=lr, schedule="constant", warmup_steps=0, grad_clip=0.0)
    return c
