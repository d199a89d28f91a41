"""PyTorch DiT/SiT ↔ ditjax conversion: key map, .pt/.safetensors files, CLI. No torch needed.

Expected keys and shapes are written out here from algorithms.md §1.5 (not taken from the converter),
and test .pt files are produced by an emulation of torch.save built on the stdlib pickler, so the
converter's own writer is not the only oracle for its reader.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import json
import os
import pickle
import zipfile

import ml_collections
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from ditjax.config import validate
from ditjax.convert import files, pytorch_dit, torch_zip
from ditjax.convert.__main__ import main
from ditjax.convert.pytorch import import_config
from ditjax.models import ARCHS, DiT, dit_config

SPEC = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}  # §1.1


def spec_shapes(depth: int, d: int, p: int, tokens: int, in_ch: int = 4, classes: int = 1000,
                learn_sigma: bool = True) -> dict[str, tuple]:
    """The torch DiT state dict (§1.5) in state_dict() order."""
    out_ch = 2 * in_ch if learn_sigma else in_ch
    shapes = {"pos_embed": (1, tokens, d), "x_embedder.proj.weight": (d, in_ch, p, p), "x_embedder.proj.bias": (d,),
              "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
              "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
              "y_embedder.embedding_table.weight": (classes + 1, d)}
    for i in range(depth):
        for name, rows, cols in [("attn.qkv", 3 * d, d), ("attn.proj", d, d), ("mlp.fc1", 4 * d, d),
                                 ("mlp.fc2", d, 4 * d), ("adaLN_modulation.1", 6 * d, d)]:
            shapes[f"blocks.{i}.{name}.weight"] = (rows, cols)
            shapes[f"blocks.{i}.{name}.bias"] = (rows,)
    shapes |= {"final_layer.linear.weight": (p * p * out_ch, d), "final_layer.linear.bias": (p * p * out_ch,),
               "final_layer.adaLN_modulation.1.weight": (2 * d, d), "final_layer.adaLN_modulation.1.bias": (2 * d,)}
    return shapes


def random_state_dict(cfg, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 bit patterns for every tensor (so a bitwise round trip means something), valid pos_embed."""
    rng = np.random.default_rng(seed)
    sd = {k: np.frombuffer(rng.bytes(4 * int(np.prod(s))), np.float32).reshape(s)
          for k, s in pytorch_dit.torch_shapes(cfg).items()}
    sd["pos_embed"] = pytorch_dit.sincos_pos_embed_2d(cfg.hidden_size, cfg.input_size // cfg.patch_size)[None]
    sd["pos_embed"] = sd["pos_embed"].astype(np.float32)
    return sd


def assert_bitwise(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert got[k].tobytes() == want[k].tobytes(), k


# ---------------------------------------------------------------------------------------------- key map

def test_dit_xl2_256_has_the_292_reference_tensors():
    shapes = pytorch_dit.torch_shapes(dit_config("DiT-XL/2", input_size=256 // 8))
    assert len(shapes) == 292
    assert list(shapes.items()) == list(spec_shapes(28, 1152, 2, 256).items())
    assert shapes["blocks.27.attn.qkv.weight"] == (3456, 1152)
    assert shapes["blocks.0.mlp.fc1.weight"] == (4608, 1152)
    assert shapes["blocks.3.adaLN_modulation.1.weight"] == (6912, 1152)
    assert shapes["final_layer.linear.weight"] == (32, 1152)
    assert shapes["final_layer.adaLN_modulation.1.weight"] == (2304, 1152)
    assert pytorch_dit.torch_shapes(dit_config("DiT-XL/2", input_size=64))["pos_embed"] == (1, 1024, 1152)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_arch_key_map_matches_spec_and_model(arch):
    size, p = arch[4:].split("/")
    depth, d, heads = SPEC[size]
    p = int(p)
    cfg = dit_config(arch, input_size=16, num_classes=10, in_channels=3, learn_sigma=False)
    assert pytorch_dit.torch_shapes(cfg) == spec_shapes(depth, d, p, (16 // p) ** 2, 3, 10, learn_sigma=False)
    for scan in (False, True):
        c = dataclasses.replace(cfg, scan_layers=scan)
        model = nnx.eval_shape(lambda c=c: DiT(c, rngs=nnx.Rngs(0)))
        flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
        assert {"/".join(map(str, k)): tuple(v.shape) for k, v in flat} == pytorch_dit.param_shapes(c)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_arch_round_trips_bitwise(arch):
    """Real arrays at the arch's width/heads/patch; depth cut to keep memory small (XL block = 96 MB)."""
    depth = 2 if arch.startswith(("DiT-S", "DiT-B")) else 1
    p = int(arch[-1])
    cfg = dit_config(arch, input_size=2 * p, num_classes=10, depth=depth)
    sd = random_state_dict(cfg)
    unscanned = pytorch_dit.from_torch(sd, cfg)
    assert_bitwise(pytorch_dit.to_torch(unscanned, cfg), sd)
    scan_cfg = dataclasses.replace(cfg, scan_layers=True)
    scanned = pytorch_dit.from_torch(sd, scan_cfg)
    assert_bitwise(pytorch_dit.to_torch(scanned, scan_cfg), sd)
    qkv = unscanned["blocks"][depth - 1]["attn"]["qkv"]["kernel"]
    assert scanned["blocks"]["attn"]["qkv"]["kernel"][depth - 1].tobytes() == qkv.tobytes()


def test_layouts_follow_the_reference_semantics():
    """Spot-check the transforms against §1.5: q/k/v row blocks, head-major rows, OIHW conv, [out, in] linears."""
    cfg = dit_config("DiT-S/4", input_size=8, depth=1, num_classes=10)
    sd = random_state_dict(cfg)
    params = pytorch_dit.from_torch(sd, cfg)
    d, dh = 384, 64
    w = sd["blocks.0.attn.qkv.weight"]
    kernel = params["blocks"][0]["attn"]["qkv"]["kernel"]  # [D, 3, H, Dh]
    np.testing.assert_array_equal(kernel[:, 1, 2, 5], w[d + 2 * dh + 5])  # K, head 2, dim 5
    proj = params["blocks"][0]["attn"]["proj"]["kernel"]  # [H, Dh, D]
    np.testing.assert_array_equal(proj[3, 7], sd["blocks.0.attn.proj.weight"][:, 3 * dh + 7])
    conv = sd["x_embedder.proj.weight"]  # [D, C, p, p]; our rows are (pi, pj, c)
    np.testing.assert_array_equal(params["x_embedder"]["proj"]["kernel"][(1 * 4 + 2) * 4 + 3], conv[:, 3, 1, 2])
    modulation = params["final_layer"]["modulation"]["kernel"]
    np.testing.assert_array_equal(modulation, sd["final_layer.adaLN_modulation.1.weight"].T)
    np.testing.assert_array_equal(params["y_embedder"]["embedding_table"], sd["y_embedder.embedding_table.weight"])


def test_sit_without_learned_sigma_and_config_inference():
    """SiT/REPA with learn_sigma=False have out_channels = in_channels; shapes alone recover the config."""
    cfg = dit_config("DiT-B/4", input_size=16, num_classes=10, learn_sigma=False, depth=12)
    sd = {k: np.zeros(s, np.float32) for k, s in pytorch_dit.torch_shapes(cfg).items()}
    assert sd["final_layer.linear.weight"].shape == (16 * 4, 768)
    assert pytorch_dit.infer_config(sd) == cfg
    sd["final_layer.linear.weight"] = np.zeros((16 * 8, 768), np.float32)
    sd["final_layer.linear.bias"] = np.zeros((16 * 8,), np.float32)
    assert pytorch_dit.infer_config(sd).learn_sigma


def test_cli_sizes_are_checked_against_shapes():
    """Latent side = image/8 unless --pixel-space; SiT names alias DiT's; whatever is named must fit."""
    pixel = dit_config("DiT-S/8", input_size=32, in_channels=3, num_classes=10)
    sd = {k: np.zeros(s, np.float32) for k, s in pytorch_dit.torch_shapes(pixel).items()}  # lazily zeroed
    assert import_config(sd, arch="SiT-S/8", image_size=32, pixel_space=True) == pixel
    assert import_config(sd) == pixel
    assert import_config(sd, scan_layers=True) == dataclasses.replace(pixel, scan_layers=True)
    with pytest.raises(ValueError, match=r"wrong shape pos_embed: expected \[1, 1, 384\], got \[1, 16, 384\]"):
        import_config(sd, arch="DiT-S/8", image_size=64)  # as latents: 64px → 8x8 → one token
    with pytest.raises(ValueError, match="not divisible by the VAE downsampling factor 8"):
        import_config(sd, image_size=100)
    with pytest.raises(ValueError, match="unknown arch"):
        import_config(sd, arch="SiT-M/2")


def test_configs_the_key_map_cannot_express_are_refused():
    cfg = dit_config("DiT-S/8", input_size=16, depth=1, readout_scale=0.5)
    with pytest.raises(ValueError, match="readout_scale=0.5"):
        pytorch_dit.torch_shapes(cfg)


def test_pos_embed_must_be_the_sincos_table():
    cfg = dit_config("DiT-S/8", input_size=16, depth=1, num_classes=10)
    sd = random_state_dict(cfg)
    sd["pos_embed"] = sd["pos_embed"] + np.float32(1e-4)
    with pytest.raises(ValueError, match="pos_embed differs"):
        pytorch_dit.from_torch(sd, cfg)


# ---------------------------------------------------------------------------------------------- files

class _Storage:
    def __init__(self, array: np.ndarray):
        self.array = array


class _TorchGlobal:
    """A reference to a torch global, written as GLOBAL by _TorchLikePickler."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):
        raise AssertionError("never called while pickling")


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, shape: tuple, stride: tuple):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride

    def __reduce__(self):
        return (_TorchGlobal("torch._utils", "_rebuild_tensor_v2"),
                (self.storage, self.offset, self.shape, self.stride, False, collections.OrderedDict()))


class _TorchLikePickler(pickle._Pickler):
    """What torch.save does: protocol 2, tensors reduced to _rebuild_tensor_v2, storages as persistent ids."""

    def __init__(self, file, storages: list):
        super().__init__(file, protocol=2)
        self.storages = storages

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            if obj not in self.storages:
                self.storages.append(obj)
            name = {np.float32: "FloatStorage", np.float16: "HalfStorage", np.int64: "LongStorage",
                    ml_dtypes.bfloat16: "BFloat16Storage"}[obj.array.dtype.type]
            return ("storage", _TorchGlobal("torch", name), str(self.storages.index(obj)), "cpu", obj.array.size)
        return None

    def save_global(self, obj, name=None):
        if isinstance(obj, _TorchGlobal):
            self.write(f"c{obj.module}\n{obj.name}\n".encode())
        else:
            super().save_global(obj, name)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[_TorchGlobal] = save_global


def torch_like_save(obj, path, archive: str = "archive") -> None:
    storages: list[_Storage] = []
    buffer = io.BytesIO()
    _TorchLikePickler(buffer, storages).dump(obj)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{archive}/data.pkl", buffer.getvalue())
        zf.writestr(f"{archive}/byteorder", "little")
        for i, storage in enumerate(storages):
            zf.writestr(f"{archive}/data/{i}", storage.array.tobytes())
        zf.writestr(f"{archive}/version", "3\n")


def tensor(array: np.ndarray) -> _Tensor:
    array = np.ascontiguousarray(array)
    return _Tensor(_Storage(array.reshape(-1)), 0, array.shape, tuple(s // array.itemsize for s in array.strides))


def test_reader_handles_torch_layouts(tmp_path):
    """Shared storages, offsets, transposed strides, half/bf16/int64 — as torch.save writes them."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((6, 8)).astype(np.float32)
    storage = _Storage(base.reshape(-1))
    sd = collections.OrderedDict(
        base=_Tensor(storage, 0, (6, 8), (8, 1)),
        transposed=_Tensor(storage, 0, (8, 6), (1, 8)),
        window=_Tensor(storage, 2 * 8 + 1, (2, 4), (8, 1)),
        half=tensor(rng.standard_normal(5).astype(np.float16)),
        bf16=tensor(rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16)),
        steps=tensor(np.arange(3, dtype=np.int64)))
    torch_like_save(sd, tmp_path / "m.pt")
    got = torch_zip.load(tmp_path / "m.pt")
    assert list(got) == list(sd)
    np.testing.assert_array_equal(got["base"], base)
    np.testing.assert_array_equal(got["transposed"], base.T)
    np.testing.assert_array_equal(got["window"], base[2:4, 1:5])
    assert got["half"].dtype == np.float16 and got["bf16"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got["bf16"], sd["bf16"].storage.array.reshape(2, 3))
    np.testing.assert_array_equal(got["steps"], [0, 1, 2])


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_files_round_trip_bitwise(tmp_path, suffix):
    cfg = dit_config("DiT-S/4", input_size=8, depth=2, num_classes=10)
    sd = random_state_dict(cfg)
    files.write_state_dict(sd, tmp_path / f"w{suffix}")
    got, source = files.read_state_dict(tmp_path / f"w{suffix}")
    if suffix == ".safetensors":
        got = {k: got[k] for k in sd}  # safetensors stores keys sorted
        assert_bitwise(safetensors.numpy.load_file(tmp_path / f"w{suffix}"), dict(sorted(sd.items())))
    assert_bitwise(got, sd)
    assert "state dict" in source


def test_writer_output_reads_like_torch_save(tmp_path):
    """Our .pt has torch's layout: one archive folder, data.pkl with protocol 2, 64-byte aligned records."""
    sd = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.array(3.0, np.float32)}
    torch_zip.save(sd, tmp_path / "x.pt")
    with zipfile.ZipFile(tmp_path / "x.pt") as zf:
        names = zf.namelist()
        assert {n.split("/")[0] for n in names} == {"x"}
        assert {"x/data.pkl", "x/byteorder", "x/version", "x/data/0", "x/data/1"} <= set(names)
        assert zf.read("x/data.pkl")[:2] == b"\x80\x02"
        for info in zf.infolist():
            assert (info.header_offset + 30 + len(info.filename) + len(info.extra)) % 64 == 0
    got = torch_zip.load(tmp_path / "x.pt")
    assert got["s"].shape == () and got["a"].tolist() == sd["a"].tolist()


def test_training_dict_prefers_ema_then_model(tmp_path):
    model = {"w": tensor(np.zeros(3, np.float32))}
    ema = {"w": tensor(np.ones(3, np.float32))}
    opt = {"state": {0: {"step": tensor(np.array(5.0, np.float32)), "exp_avg": tensor(np.ones(3, np.float32))}},
           "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}]}
    args = argparse.Namespace(model="DiT-XL/2", image_size=256)
    torch_like_save({"model": model, "ema": ema, "opt": opt, "args": args}, tmp_path / "train.pt")
    weights, source = files.read_state_dict(tmp_path / "train.pt")
    assert source == "training dict, 'ema' weights" and weights["w"].tolist() == [1, 1, 1]
    torch_like_save({"model": model, "opt": opt, "args": args, "steps": 7}, tmp_path / "no_ema.pt")
    weights, source = files.read_state_dict(tmp_path / "no_ema.pt")
    assert source == "training dict, 'model' weights" and weights["w"].tolist() == [0, 0, 0]


class _Evil:
    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return self.call, (self.arg,)


@pytest.mark.parametrize("call", [os.system, eval])
def test_malicious_pickle_is_refused(tmp_path, call):
    marker = tmp_path / "pwned"
    payload = f"touch {marker}" if call is os.system else f"open({str(marker)!r}, 'w')"
    torch_like_save({"w": tensor(np.zeros(2, np.float32)), "x": _Evil(call, payload)}, tmp_path / "evil.pt")
    with pytest.raises(torch_zip.UnsafePickleError, match="refusing to load global"):
        files.read_state_dict(tmp_path / "evil.pt")
    assert not marker.exists()


def test_non_zip_pt_is_refused(tmp_path):
    (tmp_path / "legacy.pt").write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(ValueError, match="not a torch zip checkpoint"):
        files.read_state_dict(tmp_path / "legacy.pt")


# ---------------------------------------------------------------------------------------------- CLI

@pytest.mark.slow
def test_cli_round_trip_through_checkpoint_dir(tmp_path, capsys):
    """Full-size DiT-S/8 (12 blocks) at 64px: training dict .pt → scanned SiT checkpoint → .safetensors,
    and a bare .safetensors → unscanned DiT checkpoint → .pt; both bitwise."""
    cfg = dit_config("DiT-S/8", input_size=8, num_classes=10)
    ema, model = random_state_dict(cfg, 1), random_state_dict(cfg, 2)
    torch_like_save({"model": {k: tensor(v) for k, v in model.items()},
                     "ema": {k: tensor(v) for k, v in ema.items()},
                     "args": argparse.Namespace(model="SiT-S/8")}, tmp_path / "sit.pt")
    assert main(["--from", "pytorch-sit", "--arch", "SiT-S/8", "--image-size", "64", "--num-classes", "10",
                 "--in", str(tmp_path / "sit.pt"), "--out", str(tmp_path / "ck_sit"), "--scan-layers"]) == 0
    assert "'ema' weights" in capsys.readouterr().out
    config = json.loads((tmp_path / "ck_sit" / "config.json").read_text())
    validate(ml_collections.ConfigDict(config), num_devices=1, check_data=False)  # a complete run config
    assert config["objective"]["name"] == "flow" and config["objective"]["convention"] == "sit"
    assert config["sample"]["sampler"] == "euler_maruyama" and config["model"]["scan_layers"]
    assert config["model"]["hidden_size"] == 384 and config["model"]["num_classes"] == 10
    assert main(["--to", "pytorch-sit", "--in", str(tmp_path / "ck_sit"),
                 "--out", str(tmp_path / "back.safetensors")]) == 0
    got = safetensors.numpy.load_file(tmp_path / "back.safetensors")
    assert_bitwise({k: got[k] for k in ema}, ema)

    files.write_state_dict(model, tmp_path / "dit.safetensors")
    assert main(["--from", "pytorch-dit", "--in", str(tmp_path / "dit.safetensors"),
                 "--out", str(tmp_path / "ck_dit")]) == 0  # arch, size and classes inferred from shapes
    config = json.loads((tmp_path / "ck_dit" / "config.json").read_text())
    assert config["objective"]["name"] == "ddpm" and config["sample"]["sampler"] == "ddpm"
    assert config["model"]["input_size"] == 8 and not config["model"]["scan_layers"]
    assert main(["--to", "pytorch-dit", "--in", str(tmp_path / "ck_dit"), "--out", str(tmp_path / "back.pt")]) == 0
    back, _ = files.read_state_dict(tmp_path / "back.pt")
    assert_bitwise(back, model)


def test_cli_rejects_a_mismatched_arch_before_writing(tmp_path, capsys):
    cfg = dit_config("DiT-S/8", input_size=8, depth=1, num_classes=10)
    files.write_state_dict(random_state_dict(cfg), tmp_path / "w.safetensors")
    rc = main(["--from", "pytorch-dit", "--arch", "DiT-B/8", "--image-size", "64", "--num-classes", "10",
               "--in", str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "ck")])
    err = capsys.readouterr().err
    assert rc == 2 and "wrong shape x_embedder.proj.weight: expected [768, 4, 8, 8], got [384, 4, 8, 8]" in err
    assert "missing blocks.11.attn.qkv.weight" in err
    assert not (tmp_path / "ck").exists()
