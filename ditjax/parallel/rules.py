"""Logical-axis rules: which mesh axes each logical name is split over.

A rule list maps names to mesh axes in priority order: the first rule that fits a dimension (its mesh
axes unused in that array and dividing the dimension) wins, later rules for a name are fallbacks (see
:func:`ditjax.parallel.logical.logical_to_spec`). A config picks a preset (``mesh.rules``) and may put
its own rules in front of it (``mesh.custom_rules``, e.g. ``"adaln=tensor,vocab=fsdp"``), so a custom
rule overrides the preset's rule for the same name.

Logical names used by the models: ``batch``, ``tokens`` (activations); ``embed`` (width D), ``mlp``
(MLP hidden), ``heads``, ``head_dim``, ``adaln`` (6D / 2D modulation outputs), ``vocab`` (class table
rows), ``layers`` (the stacked axis of scanned blocks), ``expert`` (MoE experts).
"""
from __future__ import annotations

from collections.abc import Mapping

Target = str | tuple[str, ...] | None
Rule = tuple[str, Target]

MESH_AXES = ("data", "fsdp", "tensor", "expert")
LOGICAL_AXES = ("batch", "tokens", "embed", "mlp", "heads", "head_dim", "adaln", "vocab", "layers", "expert")

BATCH: Rule = ("batch", ("data", "fsdp", "expert"))
# Where the width D is not divisible by the fsdp size (DiT-XL's 1152 over 256 devices), shard another
# dimension of the same kernel instead; rules are taken in order, so these only fill what is left.
FSDP_FALLBACKS: list[Rule] = [("mlp", "fsdp"), ("adaln", "fsdp"), ("heads", "fsdp"), ("head_dim", "fsdp")]

RULE_PRESETS: dict[str, list[Rule]] = {
    # Replicated parameters, batch split over every device.
    "dp": [BATCH],
    # ZeRO-3 style: parameters, EMA and optimizer state split over `fsdp`, preferably along the width D.
    "fsdp": [BATCH, ("embed", "fsdp"), ("expert", "expert"), *FSDP_FALLBACKS],
    # FSDP plus Megatron tensor parallelism: heads, MLP hidden and modulation outputs over `tensor`.
    "fsdp_tp": [BATCH, ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("adaln", "tensor"),
                ("expert", "expert"), *FSDP_FALLBACKS],
}


def parse_rules(text: str) -> list[Rule]:
    """Parse ``"name=axis,name=axis+axis,name="`` (empty target: replicated) into a rule list.

    Unknown logical names or mesh axes are errors, so a typo cannot silently replicate a tensor.
    """
    rules: list[Rule] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, target = (s.strip() for s in item.partition("="))
        if not sep or not name:
            raise ValueError(f"custom rule {item!r} is not of the form name=axis[+axis…] (e.g. 'mlp=tensor')")
        if name not in LOGICAL_AXES:
            raise ValueError(f"custom rule {item!r}: unknown logical axis {name!r}; known: {', '.join(LOGICAL_AXES)}")
        axes = tuple(a.strip() for a in target.split("+") if a.strip())
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise ValueError(f"custom rule {item!r}: unknown mesh axis {bad}; mesh axes: {', '.join(MESH_AXES)}")
        rules.append((name, None if not axes else axes[0] if len(axes) == 1 else axes))
    return rules


def rules_from_config(mesh_cfg: Mapping) -> list[Rule]:
    """The rule list of ``config.mesh``: custom rules first, then the named preset."""
    preset = mesh_cfg["rules"]
    if preset not in RULE_PRESETS:
        raise ValueError(f"mesh.rules={preset!r} is not a preset; presets: {sorted(RULE_PRESETS)} "
                         "(put your own rules in mesh.custom_rules)")
    return parse_rules(mesh_cfg.get("custom_rules", "") or "") + RULE_PRESETS[preset]


def format_rules(rules: list[Rule]) -> str:
    """The inverse of :func:`parse_rules`, for reports and logs."""
    def target(t: Target) -> str:
        return "" if t is None else t if isinstance(t, str) else "+".join(t)
    return ",".join(f"{name}={target(t)}" for name, t in rules)
