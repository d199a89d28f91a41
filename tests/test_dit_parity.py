"""DiT forward parity with an independent float64 NumPy implementation of the reference, and its init.

The NumPy model below is written from algorithms.md §1.2 on the torch-layout state dict (NCHW input,
OIHW conv, [out, in] linears, fused qkv rows), so it shares no code with ditjax: a wrong transpose in
the converter or a wrong chunk order in the model shows up as an O(1) error.

Tolerance 1e-5 (max|err| / max|ref|): the JAX side runs in float32 with HIGHEST matmul precision,
so its error is float32 rounding (unit 6e-8) accumulated over sums of up to 4D terms and two blocks,
measured at ~8e-7. The timestep features are float32 by spec (DiT computes them in fp32), and XLA's
float32 exp differs from NumPy's by 1 ulp on some frequencies, which moves cos/sin of t·freq by up to
999·6e-8 at t=999: measured total ~3e-6. A layout or semantics bug gives errors of order 1.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ditjax.convert import pytorch_dit
from ditjax.models import DiT, dit_config

RTOL = 1e-5
BF16_RTOL = 1e-2
T = np.array([0.0, 999.0, 0.37], np.float32)  # DDPM's integer ends and a SiT/REPA continuous time
Y = np.array([3, 1000, 999])  # 1000 is the null (unconditional) class
# Reduced depth (2) and input size keep this fast; width, heads and patch are the named arch's.
CASES = {"DiT-S/2": (8, True), "DiT-B/4": (16, True), "DiT-S/8": (16, False)}  # arch: (input_size, learn_sigma)


# ------------------------------------------------------------------- reference, float64, torch layout

def ref_pos_embed(dim: int, grid: int) -> np.ndarray:
    """MAE 2-D sin-cos: first half encodes the column, second half the row; [sin, cos] per half."""
    def encode(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000.0 ** (np.arange(d // 2) / (d / 2.0))
        angles = np.outer(pos, omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    row, col = np.divmod(np.arange(grid * grid), grid)
    return np.concatenate([encode(dim // 2, col.astype(np.float64)), encode(dim // 2, row.astype(np.float64))], 1)


def ref_timestep_features(t: np.ndarray, dim: int = 256) -> np.ndarray:
    """[cos, sin] (cos first) of t·freq; DiT forms the arguments in float32."""
    half = dim // 2
    freqs = np.exp(-math.log(10000) * np.arange(half, dtype=np.float32) / half)
    args = (np.asarray(t, np.float32)[:, None] * freqs[None]).astype(np.float64)
    return np.concatenate([np.cos(args), np.sin(args)], axis=-1)


def silu(x):
    return x / (1 + np.exp(-x))


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def layer_norm(x):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-6)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def ref_forward(sd: dict, heads: int, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
    """DiT.forward on NCHW input → NCHW output, everything float64."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}

    def linear(name, v):
        return v @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    n, c, h, _ = x.shape
    conv = sd["x_embedder.proj.weight"]
    d, p = conv.shape[0], conv.shape[2]
    g = h // p
    patches = x.astype(np.float64).reshape(n, c, g, p, g, p)  # stride-p conv with a p×p kernel
    tokens = np.einsum("ncipjq,dcpq->nijd", patches, conv).reshape(n, g * g, d) + sd["x_embedder.proj.bias"]
    tokens = tokens + sd["pos_embed"]
    t_emb = linear("t_embedder.mlp.2", silu(linear("t_embedder.mlp.0", ref_timestep_features(t))))
    cond = t_emb + sd["y_embedder.embedding_table.weight"][y]
    dh = d // heads
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        b = f"blocks.{i}"
        sh1, sc1, g1, sh2, sc2, g2 = np.split(linear(f"{b}.adaLN_modulation.1", silu(cond)), 6, axis=1)
        qkv = linear(f"{b}.attn.qkv", modulate(layer_norm(tokens), sh1, sc1))
        q, k, v = qkv.reshape(n, g * g, 3, heads, dh).transpose(2, 0, 3, 1, 4)  # timm Attention
        logits = (q * dh**-0.5) @ k.transpose(0, 1, 3, 2)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = (probs @ v).transpose(0, 2, 1, 3).reshape(n, g * g, d)
        tokens = tokens + g1[:, None] * linear(f"{b}.attn.proj", attn)
        hidden = gelu_tanh(linear(f"{b}.mlp.fc1", modulate(layer_norm(tokens), sh2, sc2)))
        tokens = tokens + g2[:, None] * linear(f"{b}.mlp.fc2", hidden)
    shift, scale = np.split(linear("final_layer.adaLN_modulation.1", silu(cond)), 2, axis=1)
    out = linear("final_layer.linear", modulate(layer_norm(tokens), shift, scale))
    c_out = out.shape[-1] // (p * p)
    out = np.einsum("nhwpqc->nchpwq", out.reshape(n, g, g, p, p, c_out))
    return out.reshape(n, c_out, g * p, g * p)


# ------------------------------------------------------------------- helpers

def random_torch_state_dict(cfg, seed: int = 0, adaln_scale: float = 1.0) -> dict[str, np.ndarray]:
    """Every tensor random (zero-initialised ones included): weights N(0, 1/fan_in), biases and table N(0, 1)."""
    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in pytorch_dit.torch_shapes(cfg).items():
        std = 1.0 if len(shape) == 1 or key.startswith("y_embedder") else 1 / math.sqrt(np.prod(shape[1:]))
        std *= adaln_scale if "adaLN" in key else 1.0
        sd[key] = (std * rng.standard_normal(shape)).astype(np.float32)
    sd["pos_embed"] = ref_pos_embed(cfg.hidden_size, cfg.input_size // cfg.patch_size)[None].astype(np.float32)
    return sd


def load(cfg, sd) -> DiT:
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pytorch_dit.from_torch(sd, cfg)))
    return nnx.merge(graphdef, state)


@nnx.jit
def forward(model: DiT, x, t, y):
    return model(x, t, y).output


def run_nchw(model: DiT, x: np.ndarray) -> np.ndarray:
    with jax.default_matmul_precision("highest"):
        out = forward(model, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(T), jnp.asarray(Y))
    return np.asarray(out, np.float64).transpose(0, 3, 1, 2)


@functools.cache
def case(arch: str):
    input_size, learn_sigma = CASES[arch]
    cfg = dit_config(arch, input_size=input_size, depth=2, learn_sigma=learn_sigma)
    sd = random_torch_state_dict(cfg)
    x = np.random.default_rng(1).standard_normal((len(T), cfg.in_channels, input_size, input_size))
    x = x.astype(np.float32)
    return cfg, sd, x, ref_forward(sd, cfg.num_heads, x, T, Y)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


# ------------------------------------------------------------------- tests

def test_reference_pos_embed_equals_model_table():
    np.testing.assert_allclose(ref_pos_embed(384, 4), pytorch_dit.sincos_pos_embed_2d(384, 4), rtol=0, atol=1e-15)


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
@pytest.mark.parametrize("arch", list(CASES))
def test_forward_matches_float64_reference(arch, scan):
    cfg, sd, x, ref = case(arch)
    out = run_nchw(load(dataclasses.replace(cfg, scan_layers=scan), sd), x)
    assert out.shape == ref.shape == (len(T), cfg.out_channels, cfg.input_size, cfg.input_size)
    assert rel_err(out, ref) <= RTOL


def test_bf16_compute_stays_close_to_fp32():
    """bf16 weights alone move the output ~0.4% (measured); bf16 activations roughly double that.

    adaLN weights are scaled by 0.25 so modulation (gates, shifts, scales) sits nearer trained DiTs'
    than unit-variance noise, at which the measured error is 0.8–1.2%.
    """
    cfg, _, x, _ = case("DiT-S/2")
    sd = random_torch_state_dict(cfg, adaln_scale=0.25)
    fp32 = run_nchw(load(cfg, sd), x)
    bf16 = run_nchw(load(dataclasses.replace(cfg, dtype="bfloat16"), sd), x)
    assert 0 < rel_err(bf16, fp32) <= BF16_RTOL


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
def test_fresh_model_has_reference_init(scan):
    """Zero adaLN and final layer ⇒ output exactly 0; xavier-uniform linears; N(0, 0.02²) t-MLP and labels."""
    cfg = dit_config("DiT-S/2", input_size=8, depth=2, scan_layers=scan)
    model = DiT(cfg, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 4)), jnp.float32)
    out = forward(model, x, jnp.array([10.0, 500.0]), jnp.array([1, 1000]))
    assert out.shape == (2, 8, 8, 8) and not np.asarray(out).any()

    sd = pytorch_dit.to_torch(nnx.to_pure_dict(nnx.state(model, nnx.Param)), cfg)
    d, c, p = 384, 4, 2
    fans = {"x_embedder.proj.weight": (c * p * p, d), "attn.qkv.weight": (d, 3 * d), "attn.proj.weight": (d, d),
            "mlp.fc1.weight": (d, 4 * d), "mlp.fc2.weight": (4 * d, d)}
    for key, w in sd.items():
        fan = next((f for suffix, f in fans.items() if key.endswith(suffix)), None)
        if fan is not None:
            limit = math.sqrt(6 / sum(fan))
            assert limit * 0.98 < np.abs(w).max() <= limit, key
            assert abs(w.std() / (limit / math.sqrt(3)) - 1) < 0.05, key
        elif key.startswith("t_embedder") and key.endswith("weight") or key.startswith("y_embedder"):
            assert abs(w.std() / 0.02 - 1) < 0.05 and abs(w.mean()) < 0.002, key
        elif key != "pos_embed":  # biases, adaLN modulation and the final linear start at zero
            assert not w.any(), key
    assert not np.array_equal(sd["blocks.0.attn.qkv.weight"], sd["blocks.1.attn.qkv.weight"])
