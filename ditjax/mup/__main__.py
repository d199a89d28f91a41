"""μP tools.

    python -m ditjax.mup coord-check --config configs/X.py[:ARG] --widths 64,128,256,512 --steps 4 --out DIR
    python -m ditjax.mup export --workdir RUN --out DIR    # μP run → plain-DiT inference checkpoint

``coord-check`` writes DIR/coord_check.png and DIR/coord_check.json ({"sp": {layer: slope}, "mup": …},
slopes of log mean|activation| vs log width at the last step). Widths grow heads at the base head dim;
without ``mup.base_hidden_size`` in the config the base is the smallest width.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import ml_collections


def _load_config(spec: str) -> ml_collections.ConfigDict:
    from ditjax import sweep as hyper

    path, arg = hyper.parse_config_spec(spec)
    module = hyper.load_config_module(path)
    return module.get_config(arg) if arg is not None else module.get_config()


def coord_check_cmd(args: argparse.Namespace) -> int:
    from ditjax.mup import coord_check as cc

    widths = sorted(int(w) for w in args.widths.split(","))
    config = _load_config(args.config)
    if config.mup.base_hidden_size is None:
        head_dim = config.model.hidden_size // config.model.num_heads
        config.mup.update(base_hidden_size=widths[0], base_num_heads=widths[0] // head_dim)
    config = cc.lr_config(config, args.lr)
    batches = cc.data_batches(config, args.batch_size, args.steps)
    coords = cc.coord_check(config, widths, batches, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slopes = cc.slopes(coords, widths)
    (out / "coord_check.json").write_text(json.dumps(slopes, indent=2) + "\n")
    (out / "coord_check_raw.json").write_text(json.dumps({"widths": widths, "lr": args.lr, "coords": coords}) + "\n")
    cc.plot(coords, widths, str(out / "coord_check.png"))
    for param, layers in slopes.items():
        print(f"{param:>4}: " + "  ".join(f"{k} {v:+.2f}" for k, v in layers.items()))
    print(f"wrote {out / 'coord_check.png'} and {out / 'coord_check.json'}")
    return 0


def export_cmd(args: argparse.Namespace) -> int:
    from flax import nnx

    from ditjax.checkpoint import load_inference_checkpoint, save_inference_checkpoint
    from ditjax.mup.export import fold_readout

    run_config, model = load_inference_checkpoint(args.workdir, prefer_ema=not args.raw)
    params, plain = fold_readout(nnx.to_pure_dict(nnx.state(model)), model.cfg)
    run_config["model"]["readout_scale"] = plain.readout_scale
    run_config.setdefault("mup", {})["parametrization"] = "sp"  # the folded weights are a plain DiT
    save_inference_checkpoint(args.out, run_config, params)
    print(f"wrote a plain-DiT checkpoint to {args.out} (readout multiplier {model.cfg.readout_scale:g} folded)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ditjax.mup", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cc = sub.add_parser("coord-check", help="activation size vs width under SP and μP")
    cc.add_argument("--config", required=True, help="configs/FILE.py[:ARG]")
    cc.add_argument("--widths", default="64,128,256,512")
    cc.add_argument("--steps", type=int, default=6, help="Adam steps recorded (activations before each)")
    cc.add_argument("--lr", type=float, default=0.01, help="larger than for training, as mup advises")
    cc.add_argument("--batch-size", type=int, default=16)
    cc.add_argument("--seed", type=int, default=0)
    cc.add_argument("--out", required=True)
    ex = sub.add_parser("export", help="fold the μP readout multiplier: a plain-DiT checkpoint")
    ex.add_argument("--workdir", required=True, help="a μP training run (or checkpoint directory)")
    ex.add_argument("--out", required=True)
    ex.add_argument("--raw", action="store_true", help="export the raw parameters instead of the EMA")
    args = parser.parse_args(argv)
    return coord_check_cmd(args) if args.command == "coord-check" else export_cmd(args)


if __name__ == "__main__":
    from ditjax import runtime
    runtime.start_cli()
    sys.exit(main())
