"""Turn the ``mup`` config section into what the trainer needs: model fields, init, optimizer multipliers.

One place decides everything μP changes, so the train loop makes a single call (:func:`plan_for`) and
an SP run (the default) goes through exactly the code path it always did.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from ditjax.models import DiTConfig
from ditjax.mup.roles import ParamRole, param_roles

PARAMETRIZATIONS = ("sp", "mup")
ATTN_SCALES = ("sqrt", "mup")
ParamsInit = Callable[[dict, jax.Array], dict]


@dataclasses.dataclass(frozen=True)
class MupPlan:
    """What a run trains: the (possibly μP-adjusted) model config, and μP's init and multipliers.

    For SP every optional field is None, so the trainer builds the reference DiT and plain AdamW.
    """

    model_cfg: DiTConfig
    roles: dict | None = None
    lr_multipliers: dict | None = None
    wd_multipliers: dict | None = None
    params_init: ParamsInit | None = None

    @property
    def model_overrides(self) -> dict[str, Any]:
        """The model fields μP sets, for the saved run config (so reloading builds the same forward)."""
        return {"readout_scale": self.model_cfg.readout_scale, "attn_scale": self.model_cfg.attn_scale}


def base_model_config(model_cfg: DiTConfig, mup_cfg: ml_collections.ConfigDict) -> DiTConfig:
    """The base-width model whose shapes define which dims are infinite (same depth, patch, experts)."""
    return dataclasses.replace(model_cfg, hidden_size=mup_cfg.base_hidden_size, num_heads=mup_cfg.base_num_heads)


def width_mult(model_cfg: DiTConfig, mup_cfg: ml_collections.ConfigDict) -> float:
    """m = D / D_base: the readout's fan-in ratio."""
    return model_cfg.hidden_size / mup_cfg.base_hidden_size


def mup_model_config(model_cfg: DiTConfig, mup_cfg: ml_collections.ConfigDict) -> DiTConfig:
    """Readout multiplier output_mult/m; attention 1/√d_base·(d_base/d_h) if ``attn_scale='mup'``.

    With a fixed head dim (DiT-μP widens by adding heads) both attention rules give 1/√d_h.
    """
    fields: dict[str, Any] = {"readout_scale": mup_cfg.output_mult / width_mult(model_cfg, mup_cfg)}
    if mup_cfg.attn_scale == "mup":
        d_base = mup_cfg.base_hidden_size // mup_cfg.base_num_heads
        d_h = model_cfg.hidden_size // model_cfg.num_heads
        fields["attn_scale"] = math.sqrt(d_base) / d_h
    return dataclasses.replace(model_cfg, **fields)


def init_std(role: ParamRole) -> float:
    """DiT-μP init (algorithms §6.2): fan-in normal for matrices (adaLN included), tables N(0,1), zeros else."""
    if role.role in ("output", "vector"):
        return 0.0
    return 1.0 if role.lookup else role.fan_in ** -0.5


def lr_multiplier(role: ParamRole) -> float:
    """MuAdamW: hidden weights take lr/m; everything else the base lr."""
    return 1.0 / role.width_mult if role.role == "hidden" else 1.0


def wd_multiplier(role: ParamRole) -> float:
    """MuAdamW couples wd·m to lr/m so that lr·wd (torch's decoupled decay) stays width-invariant."""
    return role.width_mult if role.role == "hidden" else 1.0


def mup_init(roles: dict) -> ParamsInit:
    """params_init for the trainer: redraw every parameter from its role's distribution."""

    def init(params: dict, key: jax.Array) -> dict:
        leaves, treedef = jax.tree.flatten(params)
        role_leaves = treedef.flatten_up_to(roles)
        keys = jax.random.split(key, len(leaves))
        new = [init_std(r) * jax.random.normal(k, p.shape, p.dtype) for p, r, k in zip(leaves, role_leaves, keys)]
        return jax.tree.unflatten(treedef, new)

    return init


def plan_for(config: ml_collections.ConfigDict, model_cfg: DiTConfig) -> MupPlan:
    """The plan for a run config; ``model_cfg`` is its model section as a DiTConfig."""
    mup_cfg = config.mup
    if mup_cfg.parametrization == "sp":
        return MupPlan(model_cfg)
    roles = param_roles(model_cfg, base_model_config(model_cfg, mup_cfg))
    is_role = lambda x: isinstance(x, ParamRole)  # noqa: E731
    return MupPlan(
        model_cfg=mup_model_config(model_cfg, mup_cfg),
        roles=roles,
        lr_multipliers=jax.tree.map(lr_multiplier, roles, is_leaf=is_role),
        wd_multipliers=jax.tree.map(wd_multiplier, roles, is_leaf=is_role),
        params_init=mup_init(roles),
    )
