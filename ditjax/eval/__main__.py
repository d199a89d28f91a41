"""python -m ditjax.eval --workdir DIR: score a run's EMA samples on the bundled digits → DIR/eval.json.

    python -m ditjax.eval --workdir runs/default [--samples 500] [--cfg-scale 2] [--sampler euler] [--steps 25]
        [--seed 0] [--raw-weights]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ditjax.config import SAMPLERS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ditjax.eval", description=__doc__)
    p.add_argument("--workdir", required=True, help="a training run directory on the bundled digits")
    p.add_argument("--samples", type=int, help="number of samples (default: the run's sample.eval_samples)")
    p.add_argument("--cfg-scale", type=float, help="guidance scale (default: the run's)")
    p.add_argument("--sampler", choices=SAMPLERS, help="default: the run's sample.sampler")
    p.add_argument("--steps", type=int, help="sampling steps (default: the run's sample.steps)")
    p.add_argument("--seed", type=int, help="noise seed (default: the run's seed)")
    p.add_argument("--raw-weights", action="store_true", help="score the raw parameters instead of the EMA")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    from ditjax.checkpoint import load_inference_checkpoint
    from ditjax.generate import split_model
    from ditjax.train.loop import evaluate_digits

    run_config, model = load_inference_checkpoint(args.workdir, prefer_ema=not args.raw_weights)
    if run_config["data"]["name"] != "digits":
        raise SystemExit(f"{args.workdir} was trained on {run_config['data']['name']!r}; this evaluator scores the "
                         "bundled digits only")
    sample = dict(run_config["sample"])
    if args.samples:
        sample["eval_samples"] = args.samples
    for key in ("cfg_scale", "sampler", "steps"):
        if getattr(args, key) is not None:
            sample[key] = getattr(args, key)
    run_config = {**run_config, "sample": sample}
    graphdef, template, params = split_model(model)
    seed = run_config["seed"] if args.seed is None else args.seed
    result = evaluate_digits(Path(args.workdir), run_config, graphdef, template, params, seed,
                             weights="raw" if args.raw_weights else "ema")
    print(json.dumps({k: v for k, v in result.items() if k != "per_class_accuracy"}, indent=2))
    print(f"wrote {Path(args.workdir) / 'eval.json'}")
    return 0


if __name__ == "__main__":
    from ditjax import runtime
    runtime.start_cli()
    sys.exit(main())
