"""Export a μP model as a plain DiT: fold the readout multiplier into the final linear weight.

μP keeps the multiplier output_mult/m outside the weight so that the readout's Adam updates scale
correctly with width; for inference it is just a constant, and folding it (W·output_mult/m, bias
unchanged, as DiT-μP does for its released checkpoints) gives the reference DiT forward.
"""
from __future__ import annotations

import dataclasses

import jax

from ditjax.models import DiTConfig


def fold_readout(params: dict, model_cfg: DiTConfig) -> tuple[dict, DiTConfig]:
    """(params, config) of a plain DiT (readout_scale 1) computing the same function as the μP model."""
    scale = model_cfg.readout_scale
    params = jax.tree.map(lambda a: a, params)  # new containers: the caller's tree is left as it was
    linear = params["final_layer"]["linear"]
    linear["kernel"] = (linear["kernel"] * scale).astype(linear["kernel"].dtype)
    return params, dataclasses.replace(model_cfg, readout_scale=1.0)
