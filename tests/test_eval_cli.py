"""The end of a digits run and the CLIs on its workdir: eval.json, `python -m ditjax.eval`, `ditjax.sample`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from ditjax.sample import main as sample_main
from test_train import ROOT, train_cmd

KEYS = {"class_accuracy", "frechet_distance", "frechet_distance_real_halves"}


@pytest.mark.slow
def test_run_ends_with_eval_json_and_the_clis_reproduce_and_sample_it(tmp_path, classifier, cache_root):
    env = {**os.environ, "DITJAX_CACHE_DIR": str(cache_root)}  # the session's classifier: loaded, not refit
    workdir = tmp_path / "run"
    train = subprocess.run(train_cmd(workdir, "--config.train.num_steps=2", "--config.train.eval_at_end=true",
                                     "--config.sample.eval_samples=20"),
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = train.stdout + train.stderr
    assert train.returncode == 0, log[-3000:]
    assert "eval: class_accuracy" in log and f"sample grid: {workdir / 'samples' / 'final.png'}" in log, log[-2000:]
    at_end = json.loads((workdir / "eval.json").read_text())
    assert KEYS <= at_end.keys() and 0 <= at_end["class_accuracy"] <= 1
    assert at_end["frechet_distance_real_halves"] == classifier.frechet_distance_real_halves
    assert at_end["frechet_distance"] > at_end["frechet_distance_real_halves"]  # 2 steps of training: noise
    assert at_end["settings"] == {"weights": "ema", "samples": 20, "seed": 0, "sampler": "euler", "steps": 2,
                                  "cfg_scale": 2.0, "cfg_channels": 0}

    def evaluate(*args: str) -> dict:
        proc = subprocess.run([sys.executable, "-m", "ditjax.eval", "--workdir", str(workdir), *args], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        assert f"wrote {workdir / 'eval.json'}" in proc.stdout
        return json.loads((workdir / "eval.json").read_text())

    # Same weights (the EMA, read back from the checkpoint), noise and settings: the trainer's numbers.
    again = evaluate()
    assert again["class_accuracy"] == at_end["class_accuracy"]
    assert again["frechet_distance"] == pytest.approx(at_end["frechet_distance"], rel=1e-6)
    other = evaluate("--raw-weights", "--samples", "10", "--steps", "3", "--cfg-scale", "1")
    assert other["settings"] == {"weights": "raw", "samples": 10, "seed": 0, "sampler": "euler", "steps": 3,
                                 "cfg_scale": 1.0, "cfg_channels": 0}

    grid = tmp_path / "grid.png"
    assert sample_main(["--checkpoint", str(workdir), "--labels", "0,1", "--steps", "2", "--out", str(grid)]) == 0
    assert Image.open(grid).size == (2 * 32, 32)
