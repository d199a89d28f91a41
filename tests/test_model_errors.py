"""Bad configs, inputs and checkpoints fail with one clear message, before JAX traces or compiles anything."""
from __future__ import annotations

import contextlib
import time

import jax
import numpy as np
import pytest
from flax import nnx

from ditjax.convert import files, pytorch_dit
from ditjax.convert.pytorch import import_pytorch
from ditjax.models import DiT, DiTConfig, dit_config

FAST_S = 1.0


@contextlib.contextmanager
def fast_and_uncompiled():
    """Fail if JAX traced a jaxpr or compiled anything, or if the block took over FAST_S seconds."""
    events: list[str] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event.startswith("/jax/core/compile/"):
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        jax.monitoring.unregister_event_duration_listener(listener)
    assert not events, f"JAX traced/compiled before the error: {events}"
    assert elapsed < FAST_S, f"error took {elapsed:.2f}s"


def test_unknown_arch():
    with fast_and_uncompiled(), pytest.raises(ValueError, match=r"unknown arch 'DiT-XXL/2'; known: DiT-S/2"):
        dit_config("DiT-XXL/2")


def test_hidden_size_not_divisible_by_heads():
    cfg, rngs = DiTConfig(hidden_size=100, num_heads=6, depth=1), nnx.Rngs(0)
    message = "hidden_size=100 is not divisible by model.num_heads=6"
    with fast_and_uncompiled(), pytest.raises(ValueError, match=message):
        DiT(cfg, rngs=rngs)


def test_input_not_divisible_by_patch():
    with fast_and_uncompiled(), pytest.raises(ValueError, match="input_size=12 is not divisible by model.patch_size=8"):
        dit_config("DiT-S/8", input_size=12)


@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (2, 8, 8, 3), (2, 16, 16, 4), (8, 8, 4)],
                         ids=["nchw", "channels", "size", "unbatched"])
def test_bad_input_shape(shape):
    model = nnx.eval_shape(lambda: DiT(dit_config("DiT-S/2", input_size=8, depth=1), rngs=nnx.Rngs(0)))
    x = np.zeros(shape, np.float32)
    message = r"does not match the model: expected \[B, \*\(8, 8, 4\)\]"
    with fast_and_uncompiled(), pytest.raises(ValueError, match=message):
        model(x, np.zeros(shape[:1], np.float32), np.zeros(shape[:1], np.int32))


def bad_state_dict() -> dict[str, np.ndarray]:
    """A DiT-S/8 state dict with one missing, one unexpected and one wrongly shaped key."""
    cfg = dit_config("DiT-S/8", input_size=16, depth=2, num_classes=10)
    sd = {k: np.zeros(s, np.float32) for k, s in pytorch_dit.torch_shapes(cfg).items()}
    del sd["blocks.1.mlp.fc1.bias"]
    sd["blocks.0.attn.q_norm.weight"] = np.zeros(64, np.float32)
    sd["final_layer.linear.weight"] = np.zeros((128, 768), np.float32)
    return sd


EXPECTED_LINES = ["(3 offending entries)", "missing blocks.1.mlp.fc1.bias: expected [1536]",
                  "unexpected blocks.0.attn.q_norm.weight: got [64]",
                  "wrong shape final_layer.linear.weight: expected [512, 384], got [128, 768]"]


def test_state_dict_with_bad_keys_names_every_offender():
    sd = bad_state_dict()
    cfg = dit_config("DiT-S/8", input_size=16, depth=2, num_classes=10)
    with fast_and_uncompiled(), pytest.raises(ValueError) as info:
        pytorch_dit.from_torch(sd, cfg)
    for line in EXPECTED_LINES:
        assert line in str(info.value)


def test_bad_checkpoint_file_fails_before_anything_is_written(tmp_path):
    files.write_state_dict(bad_state_dict(), tmp_path / "bad.safetensors")
    with fast_and_uncompiled(), pytest.raises(ValueError) as info:
        import_pytorch(tmp_path / "bad.safetensors", tmp_path / "ck", "pytorch-dit", arch="DiT-S/8", image_size=128,
                       num_classes=10)
    assert "wrong shape final_layer.linear.weight" in str(info.value)
    assert not (tmp_path / "ck").exists()


def test_params_with_bad_paths_name_every_offender():
    cfg = dit_config("DiT-S/8", input_size=16, depth=2, num_classes=10)
    params = pytorch_dit.from_torch({k: np.zeros(s, np.float32) for k, s in pytorch_dit.torch_shapes(cfg).items()}
                                    | {"pos_embed": pytorch_dit.sincos_pos_embed_2d(384, 2)[None]}, cfg)
    del params["blocks"][1]["attn"]["proj"]
    params["final_layer"]["linear"]["bias"] = np.zeros(3, np.float32)
    with fast_and_uncompiled(), pytest.raises(ValueError) as info:
        pytorch_dit.to_torch(params, cfg)
    message = str(info.value)
    assert "missing blocks/1/attn/proj/kernel: expected [6, 64, 384]" in message
    assert "wrong shape final_layer/linear/bias: expected [512], got [3]" in message
