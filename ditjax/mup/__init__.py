"""μP (maximal-update parametrization) for DiT: width-transferable init, learning rates and readout.

Turned on by the ``mup`` config section; see docs/mup.md. The trainer asks :func:`plan_for` once.
"""
from ditjax.mup.export import fold_readout
from ditjax.mup.plan import (ATTN_SCALES, PARAMETRIZATIONS, MupPlan, base_model_config, init_std, lr_multiplier,
                             mup_init, mup_model_config, plan_for, wd_multiplier, width_mult)
from ditjax.mup.roles import ROLES, ParamRole, param_roles

__all__ = ["ATTN_SCALES", "PARAMETRIZATIONS", "ROLES", "MupPlan", "ParamRole", "base_model_config", "fold_readout",
           "init_std", "lr_multiplier", "mup_init", "mup_model_config", "param_roles", "plan_for", "wd_multiplier",
           "width_mult"]
