"""Every shipped config builds and passes validation; overrides are type-checked."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ditjax.config import ConfigError, base_config, validate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def load(name: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)


@pytest.mark.parametrize("name, arg", [
    ("default", None), ("flow_digits", "sit"), ("flow_digits", "repa"),
    ("imagenet_latent", "DiT-XL/2"), ("imagenet_latent", "DiT-B/4,512"), ("sit_latent", "DiT-XL/2"),
])
def test_shipped_configs_validate(name, arg):
    config = load(name, arg)
    # ImageNet latents are not on this machine: everything but the dataset check must pass.
    validate(config, num_devices=8, check_data=config.data.name == "digits")


def test_imagenet_recipe_is_the_papers():
    c = load("imagenet_latent", "DiT-XL/2")
    assert (c.model.depth, c.model.hidden_size, c.model.num_heads, c.model.patch_size) == (28, 1152, 16, 2)
    assert (c.model.input_size, c.optim.lr, c.optim.weight_decay, c.train.global_batch_size) == (32, 1e-4, 0.0, 256)
    assert c.train.ema_decay == 0.9999 and c.objective.name == "ddpm" and c.model.learn_sigma


@pytest.mark.parametrize("mutate, key", [
    (lambda c: c.train.__setattr__("num_steps", 0), "train.num_steps"),
    (lambda c: c.model.__setattr__("num_heads", 5), "num_heads"),
    (lambda c: c.sample.__setattr__("sampler", "ddpm"), "sample.sampler"),  # flow model, DDPM sampler
    (lambda c: c.mesh.__setattr__("fsdp", 3), "mesh"),
    (lambda c: c.model.__setattr__("in_channels", 3), "in_channels"),  # digits are grey
])
def test_impossible_values_name_the_key(mutate, key):
    config = load("default")
    mutate(config)
    with pytest.raises(ConfigError, match=key):
        validate(config, num_devices=8)


def test_unknown_key_and_wrong_type():
    config = base_config()
    config.unlock()
    config.train.num_stepz = 5
    with pytest.raises(ConfigError, match="num_stepz"):
        validate(config, num_devices=1, check_data=False)
    config = base_config()
    with pytest.raises(TypeError):
        config.train.num_steps = "many"


def test_decoded_cache_must_fit_in_memory(monkeypatch):
    import psutil

    config = load("default")
    config.data.cache_decoded = True
    validate(config, num_devices=1)  # 5,000 × 32×32 bytes: fits anywhere
    free = type("Free", (), {"available": 4_000_000})()  # 4 MB free: under twice the 5.1 MB it needs
    monkeypatch.setattr(psutil, "virtual_memory", lambda: free)
    with pytest.raises(ConfigError, match="data.cache_decoded=True would hold"):
        validate(config, num_devices=1)
