"""Sample from a training run or a converted checkpoint, no training code needed.

    python -m ditjax.sample --checkpoint CKPT_DIR --labels 207,360 --sampler ddim --steps 50 --cfg-scale 4.0 \
        [--cfg-channels 3] [--guidance-interval 0,0.7] --seed 0 --out grid.png [--noise x.npy] [--save-latents z.npy]

``--noise`` and ``--save-latents`` are NCHW, the layout PyTorch users hold, so a run can be compared number for
number with another implementation. Pixel-space models write a PNG grid; latent models (no decoder here) write
their latents and say so.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from ditjax.config import SAMPLERS


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ditjax.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a training workdir or a converted checkpoint directory")
    p.add_argument("--labels", required=True, help="comma-separated class ids, one sample each")
    p.add_argument("--sampler", choices=SAMPLERS, help="default: the run config's sampler")
    p.add_argument("--steps", type=int, help="default: the run config's")
    p.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--cfg-channels", type=int, help="guide only the first N channels (3 = DiT legacy); 0 = all")
    p.add_argument("--guidance-interval", help="LOW,HIGH: guide only for objective time in [LOW, HIGH]")
    p.add_argument("--eta", type=float, help="DDIM stochasticity")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", help="initial noise .npy, NCHW [N, C, H, W]")
    p.add_argument("--save-latents", help="write the final samples as .npy, NCHW")
    p.add_argument("--raw-weights", action="store_true", help="use the raw parameters instead of the EMA")
    p.add_argument("--out", required=True, help="output PNG grid (pixel models) or .npy (latent models)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    labels = np.array([int(s) for s in args.labels.split(",")], np.int32)
    import jax

    from ditjax.checkpoint import load_inference_checkpoint
    from ditjax.generate import generate, save_grid, split_model

    run_config, model = load_inference_checkpoint(args.checkpoint, prefer_ema=not args.raw_weights)
    m = run_config["model"]
    if labels.min() < 0 or labels.max() >= m["num_classes"]:
        raise SystemExit(f"--labels must lie in [0, {m['num_classes']}) for this model")
    shape_nchw = (len(labels), m["in_channels"], m["input_size"], m["input_size"])
    if args.noise:
        noise_nchw = np.load(args.noise).astype(np.float32)
        if noise_nchw.shape != shape_nchw:
            raise SystemExit(f"--noise has shape {noise_nchw.shape}; this model and {len(labels)} labels need "
                             f"{shape_nchw} (NCHW)")
    else:
        noise_nchw = np.asarray(jax.random.normal(jax.random.PRNGKey(args.seed), shape_nchw), np.float32)

    sample_cfg = dict(run_config["sample"])
    for key, value in (("cfg_channels", args.cfg_channels), ("eta", args.eta)):
        if value is not None:
            sample_cfg[key] = value
    if args.guidance_interval:
        sample_cfg["guidance_low"], sample_cfg["guidance_high"] = map(float, args.guidance_interval.split(","))
    run_config = {**run_config, "sample": sample_cfg}

    graphdef, template, params = split_model(model)
    images = generate(graphdef, template, params, run_config, labels, noise_nchw.transpose(0, 2, 3, 1),
                      jax.random.PRNGKey(args.seed + 1), sampler=args.sampler, steps=args.steps,
                      cfg_scale=args.cfg_scale, batch_size=len(labels))
    latents_nchw = images.transpose(0, 3, 1, 2)
    if args.save_latents:
        np.save(args.save_latents, latents_nchw)
        print(f"wrote final samples (NCHW {latents_nchw.shape}) to {args.save_latents}")
    if m["in_channels"] in (1, 3):
        save_grid(images, args.out, columns=min(len(labels), 8))
        print(f"wrote {len(labels)} samples to {args.out}")
    else:
        out = args.out if args.out.endswith(".npy") else args.out.rsplit(".", 1)[0] + ".npy"
        np.save(out, latents_nchw)
        print(f"this is a latent model ({m['in_channels']} channels) and ditjax has no VAE decoder: wrote the "
              f"latents (NCHW, scaled as in training) to {out}; decode them with your VAE (e.g. diffusers "
              "AutoencoderKL sd-vae-ft-ema after dividing by 0.18215)")
    return 0


if __name__ == "__main__":
    from ditjax import runtime
    runtime.start_cli()
    sys.exit(main())
