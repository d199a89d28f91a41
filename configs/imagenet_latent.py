"""DiT on ImageNet VAE latents with the paper's recipe (Peebles & Xie): AdamW 1e-4, no weight decay,
global batch 256, EMA 0.9999, DDPM hybrid loss with learned Σ, 250-step sampling with guidance 1.5.

    python -m ditjax.train --config configs/imagenet_latent.py:DiT-XL/2 --workdir gs://bucket/dit-xl2
    python -m ditjax.train --config configs/imagenet_latent.py:DiT-XL/2,512 …   # 512px (64×64 latents)

Latents: a directory written by `ditjax.data.latents.write_latents` (see docs/data.md), set with
--config.data.latent_path=DIR. The argument is "ARCH[,RESOLUTION]".
"""
from ditjax.config import base_config, set_arch


def get_config(arg: str = "DiT-XL/2"):
    arch, _, resolution = arg.partition(",")
    resolution = int(resolution or 256)
    c = base_config()
    set_arch(c.model, arch)
    c.model.update(input_size=resolution // 8, in_channels=4, num_classes=1000, learn_sigma=True,
                   scan_layers=True)
    c.objective.update(name="ddpm")
    c.data.update(name="latents", latent_path="", random_flip=True, latent_scale=0.18215)
    c.optim.update(lr=1e-4, schedule="constant", weight_decay=0.0)
    c.train.update(global_batch_size=256, num_steps=400_000, ema_decay=0.9999, log_every=100,
                   checkpoint_every=10_000, keep_last=2, keep_every=50_000, eval_at_end=False)
    c.sample.update(sampler="ddpm", steps=250, cfg_scale=1.5, cfg_channels=3)
    c.mesh.update(data=-1, fsdp=1, rules="dp")
    return c
