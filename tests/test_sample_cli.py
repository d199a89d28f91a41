"""`python -m ditjax.sample` on checkpoints the test creates: NCHW noise in, NCHW latents out, PNG grids."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from ditjax import checkpoint
from ditjax.config import base_config
from ditjax.models import DiT, dit_config
from ditjax.sample import main


def random_checkpoint(directory, *, in_channels: int, objective: dict, sample: dict) -> dict:
    """A tiny DiT with every weight random (the reference init would output zeros)."""
    cfg = dit_config("DiT-S/8", input_size=16, in_channels=in_channels, depth=2, hidden_size=64, num_heads=2,
                     num_classes=10, learn_sigma=objective["name"] == "ddpm")
    params = nnx.to_pure_dict(nnx.state(DiT(cfg, rngs=nnx.Rngs(0))))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree.unflatten(tree, [0.05 * jax.random.normal(k, a.shape) for k, a in zip(keys, leaves)])
    run_config = base_config().to_dict()
    run_config.update(model=dataclasses.asdict(cfg), objective={**run_config["objective"], **objective},
                      sample={**run_config["sample"], **sample})
    checkpoint.save_inference_checkpoint(directory, run_config, params)
    return run_config


@pytest.fixture(scope="module")
def ddpm_latent_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddpm")
    random_checkpoint(d, in_channels=4, objective={"name": "ddpm"}, sample={"sampler": "ddim", "steps": 5})
    return d


def test_ddim_eta0_is_deterministic_given_noise_and_writes_nchw(ddpm_latent_ckpt, tmp_path, capsys):
    noise = np.random.default_rng(0).standard_normal((2, 4, 16, 16)).astype(np.float32)
    np.save(tmp_path / "noise.npy", noise)
    outs = []
    for i in range(2):
        out = tmp_path / f"z{i}.npy"
        assert main(["--checkpoint", str(ddpm_latent_ckpt), "--labels", "3,7", "--sampler", "ddim", "--steps", "5",
                     "--cfg-scale", "4.0", "--cfg-channels", "3", "--noise", str(tmp_path / "noise.npy"),
                     "--save-latents", str(out), "--out", str(tmp_path / "grid.png")]) == 0
        outs.append(np.load(out))
    assert outs[0].shape == (2, 4, 16, 16)
    np.testing.assert_array_equal(outs[0], outs[1])
    assert np.isfinite(outs[0]).all() and not np.allclose(outs[0], noise)
    text = capsys.readouterr().out
    assert "latent model" in text and (tmp_path / "grid.npy").exists()  # no decoder: latents, and it says so


def test_different_noise_gives_different_samples(ddpm_latent_ckpt, tmp_path):
    results = []
    for seed in (0, 1):
        out = tmp_path / f"s{seed}.npy"
        main(["--checkpoint", str(ddpm_latent_ckpt), "--labels", "1", "--sampler", "ddim", "--steps", "3",
              "--seed", str(seed), "--save-latents", str(out), "--out", str(tmp_path / "g.npy")])
        results.append(np.load(out))
    assert not np.allclose(results[0], results[1])


def test_pixel_model_writes_png_grid(tmp_path):
    random_checkpoint(tmp_path / "ckpt", in_channels=1, objective={"name": "flow", "time_scale": 1000.0},
                      sample={"sampler": "euler", "steps": 4})
    out = tmp_path / "grid.png"
    assert main(["--checkpoint", str(tmp_path / "ckpt"), "--labels", "0,1,2", "--cfg-scale", "2",
                 "--out", str(out)]) == 0
    from PIL import Image

    assert Image.open(out).size == (3 * 16, 16)


def test_bad_noise_shape_is_a_clear_error(ddpm_latent_ckpt, tmp_path):
    np.save(tmp_path / "n.npy", np.zeros((1, 16, 16, 4), np.float32))  # NHWC by mistake
    with pytest.raises(SystemExit, match="NCHW"):
        main(["--checkpoint", str(ddpm_latent_ckpt), "--labels", "1", "--noise", str(tmp_path / "n.npy"),
              "--out", str(tmp_path / "g.png")])
