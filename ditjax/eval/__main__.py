"""python -m ditjax.eval --workdir DIR: score a run's EMA samples on the bundled digits → DIR/eval.json."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ditjax.eval", description=__doc__)
    p.add_argument("--workdir", required=True, help="a training run directory on the bundled digits")
    p.add_argument("--samples", type=int, help="number of samples (default: the run's sample.eval_samples)")
    p.add_argument("--cfg-scale", type=float, help="guidance scale (default: the run's)")
    p.add_argument("--seed", type=int, help="noise seed (default: the run's seed)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    from ditjax.checkpoint import load_inference_checkpoint
    from ditjax.generate import split_model
    from ditjax.train.loop import evaluate_digits

    run_config, model = load_inference_checkpoint(args.workdir)
    if run_config["data"]["name"] != "digits":
        raise SystemExit(f"{args.workdir} was trained on {run_config['data']['name']!r}; this evaluator scores the "
                         "bundled digits only")
    sample = dict(run_config["sample"])
    if args.samples:
        sample["eval_samples"] = args.samples
    if args.cfg_scale is not None:
        sample["cfg_scale"] = args.cfg_scale
    run_config = {**run_config, "sample": sample}
    graphdef, template, params = split_model(model)
    seed = run_config["seed"] if args.seed is None else args.seed
    result = evaluate_digits(Path(args.workdir), run_config, graphdef, template, params, seed)
    print(json.dumps({k: v for k, v in result.items() if k != "per_class_accuracy"}, indent=2))
    return 0


if __name__ == "__main__":
    from ditjax.logs import setup_logging
    setup_logging()
    sys.exit(main())
