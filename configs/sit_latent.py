"""SiT (flow matching, linear interpolant, velocity) on ImageNet VAE latents, SiT's recipe.

    python -m ditjax.train --config configs/sit_latent.py:DiT-XL/2 --workdir DIR --config.data.latent_path=LATENTS

Noise sits at t=0 (SiT convention); sampling uses the Euler–Maruyama SDE, 250 steps, guidance 1.5 on 3
channels. Set --config.objective.convention=repa for the REPA/HASTE convention (noise at t=1).
"""
from configs.imagenet_latent import get_config as dit_latent_config


def get_config(arg: str = "DiT-XL/2"):
    c = dit_latent_config(arg)
    c.objective.update(name="flow", convention="sit", time_sampling="uniform", time_scale=1.0)
    c.sample.update(sampler="euler_maruyama", steps=250, cfg_scale=1.5, cfg_channels=3)
    return c
