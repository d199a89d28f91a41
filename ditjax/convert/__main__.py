r"""python -m ditjax.convert: PyTorch DiT/SiT weights ↔ ditjax checkpoint directories.

  python -m ditjax.convert --from pytorch-dit --arch DiT-XL/2 --image-size 256 --in DiT-XL-2-256x256.pt \
      --out runs/dit-xl2-256
  python -m ditjax.convert --to pytorch-sit --in runs/sit-xl2 --out SiT-XL-2.safetensors

On import, --arch/--image-size/--num-classes/--channels are checked against the tensor shapes and
inferred from them when omitted.
"""
from __future__ import annotations

import argparse
import sys

from ditjax.convert.pytorch import RECIPES, export_pytorch, import_pytorch
from ditjax.convert.pytorch_dit import describe


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ditjax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="source_format", choices=list(RECIPES),
                           help="import a PyTorch state dict (.pt or .safetensors) into a checkpoint directory")
    direction.add_argument("--to", dest="target_format", choices=list(RECIPES),
                           help="export a checkpoint directory to a PyTorch state dict (.pt or .safetensors)")
    parser.add_argument("--in", dest="source", required=True, help="input file (import) or directory (export)")
    parser.add_argument("--out", required=True, help="output directory (import) or file (export)")
    parser.add_argument("--arch", help="DiT-S/2 … DiT-XL/8 (SiT- names too); inferred from shapes if omitted")
    parser.add_argument("--image-size", type=int, help="image side in pixels (latent side = image size / 8)")
    parser.add_argument("--num-classes", type=int, help="class count, without the null class (e.g. 1000)")
    parser.add_argument("--channels", "--latent-channels", type=int, dest="channels",
                        help="input channels (4 for SD-VAE latents, 3 for RGB pixels)")
    parser.add_argument("--pixel-space", action="store_true",
                        help="the model runs on pixels: latent side = image size, no VAE")
    parser.add_argument("--scan-layers", action="store_true", help="store blocks stacked for a scanned model")
    args = parser.parse_args(argv)
    if args.target_format and (args.arch or args.image_size or args.num_classes or args.channels
                               or args.pixel_space or args.scan_layers):
        parser.error("--arch/--image-size/--num-classes/--channels/--pixel-space/--scan-layers apply to "
                     "--from only: an export takes everything from the checkpoint's config.json")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.source_format:
            cfg, weights = import_pytorch(args.source, args.out, args.source_format, arch=args.arch,
                                          image_size=args.image_size, pixel_space=args.pixel_space,
                                          channels=args.channels, num_classes=args.num_classes,
                                          scan_layers=args.scan_layers)
            print(f"imported {describe(cfg)} from {args.source} ({weights}) into {args.out}")
        else:
            cfg, config = export_pytorch(args.source, args.out, args.target_format)
            print(f"exported {describe(cfg)} ({config.get('objective', {}).get('name')} objective) from {args.source} "
                  f"to {args.out}")
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
