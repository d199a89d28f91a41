"""μP: parameter roles against algorithms.md §6.2, base-width equivalence with SP, init, coord check, export."""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from ditjax import mup
from ditjax.config import ConfigError, base_config, model_config, validate
from ditjax.models import DiT
from ditjax.mup import coord_check as cc
from ditjax.train.optim import make_optimizer

BASE_D, BASE_H = 16, 2  # head dim 8; widths grow by adding heads


def _config(width: int = 2 * BASE_D, parametrization: str = "mup", scan: bool = False):
    c = base_config()
    c.model.update(input_size=8, patch_size=4, in_channels=1, hidden_size=width, depth=2, num_heads=width // 8,
                   num_classes=10, learn_sigma=False, scan_layers=scan)
    c.objective.update(name="flow", time_scale=1000.0)
    c.sample.update(sampler="euler")
    c.mup.update(parametrization=parametrization, base_hidden_size=BASE_D, base_num_heads=BASE_H)
    return c


def _plan(config):
    return mup.plan_for(config, model_config(config))


def _flat(tree, leaf=None):
    items = jax.tree_util.tree_flatten_with_path(tree, is_leaf=leaf)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): v for path, v in items}


# algorithms.md §6.2 at m = 2, fan-in of the reference table: (role, init std, Adam lr mult, wd mult).
D, M = 2 * BASE_D, 2.0
REFERENCE = {
    r"x_embedder/proj/kernel": ("input", (4 * 4 * 1) ** -0.5, 1, 1),   # N(0, 1/(C·p²))
    r"t_embedder/mlp_in/kernel": ("input", 256 ** -0.5, 1, 1),        # N(0, 1/256)
    r"y_embedder/embedding_table": ("input", 1.0, 1, 1),              # N(0, 1)
    r"t_embedder/mlp_out/kernel": ("hidden", D ** -0.5, 1 / M, M),
    r"blocks/(\d+/)?attn/(qkv|proj)/kernel": ("hidden", D ** -0.5, 1 / M, M),
    r"blocks/(\d+/)?mlp/fc1/kernel": ("hidden", D ** -0.5, 1 / M, M),
    r"blocks/(\d+/)?mlp/fc2/kernel": ("hidden", (4 * D) ** -0.5, 1 / M, M),
    r"blocks/(\d+/)?modulation/kernel": ("hidden", D ** -0.5, 1 / M, M),  # adaLN: NOT zero
    r"final_layer/modulation/kernel": ("hidden", D ** -0.5, 1 / M, M),
    r"final_layer/linear/kernel": ("output", 0.0, 1, 1),                 # MuReadout: zero, × output_mult/m
    r".*/bias": ("vector", 0.0, 1, 1),
}


def _reference(path: str) -> tuple:
    hits = [v for pattern, v in REFERENCE.items() if re.fullmatch(pattern, path)]
    assert len(hits) == 1, f"{path} matches {len(hits)} reference rows"
    return hits[0]


@pytest.mark.parametrize("scan", [False, True])
def test_every_param_role_and_multiplier_matches_reference_table(scan):
    plan = _plan(_config(scan=scan))
    roles = _flat(plan.roles, leaf=lambda x: isinstance(x, mup.ParamRole))
    lrs, wds = _flat(plan.lr_multipliers), _flat(plan.wd_multipliers)
    params = _flat(nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: DiT(plan.model_cfg, rngs=nnx.Rngs(0))))))
    assert roles.keys() == params.keys() == lrs.keys() == wds.keys()
    assert len(roles) == (21 if scan else 31)  # 10 per block, 11 outside
    for path, role in roles.items():
        want_role, want_std, want_lr, want_wd = _reference(path)
        got = (role.role, mup.init_std(role), lrs[path], wds[path])
        assert got == pytest.approx((want_role, want_std, want_lr, want_wd)), path
    assert plan.model_cfg.readout_scale == pytest.approx(1.0 / M)
    assert plan.model_cfg.attn_scale is None  # fixed head dim: 1/√d_h either way


def test_sp_plan_is_the_reference_dit():
    config = _config(parametrization="sp")
    plan = _plan(config)
    assert plan.model_cfg == model_config(config)
    assert plan.lr_multipliers is plan.wd_multipliers is plan.params_init is None


def test_attn_scale_mup_when_head_dim_grows():
    c = _config(width=32)
    c.model.num_heads = BASE_H  # head dim 16 = 2 × the base's 8
    c.mup.attn_scale = "mup"
    assert _plan(c).model_cfg.attn_scale == pytest.approx(8 ** -0.5 * 8 / 16)


def test_validation_requires_base_shape():
    c = _config()
    c.mup.base_hidden_size = None
    with pytest.raises(ConfigError, match="mup.base_hidden_size"):
        validate(c, num_devices=1, check_data=False)
    c = _config()
    c.model.readout_scale = 0.5
    with pytest.raises(ConfigError, match="readout_scale"):
        validate(c, num_devices=1, check_data=False)


def test_transfer_sweep_config():
    from pathlib import Path

    from ditjax import sweep as hyper

    spec = str(Path(__file__).resolve().parents[1] / "configs" / "mup_transfer.py")
    points = hyper.load_sweep(spec)
    widths = sorted({p["model.hidden_size"] for p in points})
    assert len(points) >= 56 and len({p["optim.lr"] for p in points}) >= 7 and widths[-1] >= 8 * widths[0]
    config = hyper.load_config_module(Path(spec)).get_config()
    assert config.mup.base_hidden_size == widths[0]
    for p in points:
        c = ml_collections.ConfigDict(config.to_dict())
        for key, value in p.items():
            section, name = key.split(".")
            c[section][name] = value
        assert c.model.hidden_size // c.model.num_heads == 16  # heads grow, head dim fixed
        validate(c, num_devices=1)


def _dit_params(model_cfg, seed=0):
    """The reference DiT init as a pure dict (jitted: eager init is slow on a busy CPU)."""
    return jax.jit(lambda: nnx.to_pure_dict(nnx.state(DiT(model_cfg, rngs=nnx.Rngs(seed)))))()


def _forward(model_cfg, params, batch):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DiT(model_cfg, rngs=nnx.Rngs(0))))

    def apply(params):
        s = jax.tree.map(lambda v: v, state)
        nnx.replace_by_pure_dict(s, params)
        return nnx.merge(graphdef, s)(batch["image"], batch["t"], batch["label"]).output

    return apply(params) if params is not None else apply


def _train(config, params, batch, steps=3):
    plan = _plan(config)
    config.optim.update(lr=1e-2, weight_decay=0.1)
    tx, _ = make_optimizer(config.optim, steps, lr_multipliers=plan.lr_multipliers,
                           wd_multipliers=plan.wd_multipliers)
    apply = _forward(plan.model_cfg, None, batch)

    @jax.jit
    def step(params, opt_state):
        grads = jax.grad(lambda p: jnp.mean((apply(p) - batch["target"]) ** 2))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    for _ in range(steps):
        params, opt_state = step(params, opt_state)
    return params


def _batch(key=0, n=4):
    k = jax.random.split(jax.random.PRNGKey(key), 4)
    return {"image": jax.random.normal(k[0], (n, 8, 8, 1)), "target": jax.random.normal(k[1], (n, 8, 8, 1)),
            "t": jax.random.uniform(k[2], (n,)) * 1000, "label": jax.random.randint(k[3], (n,), 0, 10)}


def test_at_base_width_mup_and_sp_take_identical_steps():
    mup_cfg = _config(width=BASE_D, scan=True)  # scanned: one block to compile
    plan = _plan(mup_cfg)
    assert set(jax.tree.leaves(plan.lr_multipliers)) == {1.0} == set(jax.tree.leaves(plan.wd_multipliers))
    assert plan.model_cfg.readout_scale == 1.0
    is_role = lambda x: isinstance(x, mup.ParamRole)  # noqa: E731
    wide = _plan(_config(width=2 * BASE_D, scan=True))
    # roles come from a delta model, so the readout is still zero-init "output" at m = 1
    assert ({k: r.role for k, r in _flat(plan.roles, is_role).items()}
            == {k: r.role for k, r in _flat(wide.roles, is_role).items()})
    params = jax.jit(plan.params_init)(_dit_params(plan.model_cfg), jax.random.PRNGKey(1))
    batch = _batch()
    after_mup = _train(mup_cfg, params, batch)
    after_sp = _train(_config(width=BASE_D, parametrization="sp", scan=True), params, batch)
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), after_mup, params)
    assert all(jax.tree.leaves(moved))  # every parameter was updated (so the check is not vacuous)
    jax.tree.map(np.testing.assert_array_equal, after_mup, after_sp)


def test_mup_init_differs_from_dit_init():
    plan = _plan(_config(width=4 * BASE_D, scan=True))
    dit = _dit_params(plan.model_cfg)
    ours = _flat(jax.jit(plan.params_init)(dit, jax.random.PRNGKey(0)))
    dit = _flat(dit)
    roles = _flat(plan.roles, leaf=lambda x: isinstance(x, mup.ParamRole))
    d = 4 * BASE_D
    # DiT zeroes every adaLN; DiT-μP draws them N(0, 1/fan_in). DiT's tables are N(0, 0.02²), μP's N(0, 1).
    for path in ("blocks/modulation/kernel", "final_layer/modulation/kernel"):
        assert not np.any(dit[path])
        assert np.std(ours[path]) == pytest.approx(d ** -0.5, rel=0.1)
    assert np.std(dit["y_embedder/embedding_table"]) == pytest.approx(0.02, rel=0.2)
    assert np.std(ours["y_embedder/embedding_table"]) == pytest.approx(1.0, rel=0.2)
    assert np.std(ours["blocks/mlp/fc2/kernel"]) == pytest.approx((4 * d) ** -0.5, rel=0.1)
    assert np.std(ours["x_embedder/proj/kernel"]) == pytest.approx(16 ** -0.5, rel=0.2)
    for path, role in roles.items():
        if role.role in ("output", "vector"):
            assert not np.any(ours[path]), path


def test_fold_readout_gives_plain_dit_with_same_output():
    plan = _plan(_config(width=4 * BASE_D, scan=True))
    assert plan.model_cfg.readout_scale == pytest.approx(0.25)
    shapes = jax.eval_shape(lambda: _dit_params(plan.model_cfg))
    params = jax.tree.map(lambda a: 0.1 * jax.random.normal(jax.random.PRNGKey(a.size), a.shape), shapes)
    batch = _batch(n=3)
    folded, plain = mup.fold_readout(params, plan.model_cfg)
    assert plain == dataclasses.replace(plan.model_cfg, readout_scale=1.0)
    want = jax.jit(_forward(plan.model_cfg, None, batch))(params)
    plain_forward = jax.jit(_forward(plain, None, batch))
    assert float(jnp.abs(want).mean()) > 1e-2  # a nonzero readout, so the multiplier matters
    np.testing.assert_allclose(plain_forward(folded), want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(plain_forward(params), want)  # without folding the plain DiT differs


def test_coord_check_flat_under_mup_growing_under_sp():
    """Hidden-layer outputs (attention/MLP branches, conditioning MLP) after 5 Adam steps at lr 0.01.

    One 8×8 image (4 tokens) repeated keeps the updates coherent, the regime μP is derived for; with many
    independent rows the tiny widths here would be dominated by finite-width noise. Observed: mean slope
    SP ≈ +0.76, μP ≈ -0.11 (per layer μP stays within ±0.5); thresholds SP > 0.5, |μP| < 0.3.
    """
    config = cc.lr_config(_config(width=32), 0.01)
    config.mup.update(base_hidden_size=32, base_num_heads=4)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.standard_normal((1, 8, 8, 1)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, 1), jnp.int32)}
    widths = (32, 128)
    slopes = cc.slopes(cc.coord_check(config, widths, [batch] * 6), widths)
    hidden = [k for k in slopes["sp"] if k.endswith((".attn", ".mlp")) or k == "cond"]
    assert len(hidden) == 5
    sp, mu = (float(np.mean([slopes[p][k] for k in hidden])) for p in ("sp", "mup"))
    assert sp > 0.5, slopes["sp"]
    assert abs(mu) < 0.3, slopes["mup"]
