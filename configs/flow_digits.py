"""Flow-matching variants on the bundled digits: `:sit` (noise at t=0, default) or `:repa` (noise at t=1),
sampled with Heun; handy for comparing conventions and samplers on a laptop.

    python -m ditjax.train --config configs/flow_digits.py:repa --workdir runs/flow_repa
"""
from configs.default import get_config as default_config


def get_config(convention: str = "sit"):
    c = default_config()
    c.objective.convention = convention
    c.sample.update(sampler="heun", steps=25)
    return c
