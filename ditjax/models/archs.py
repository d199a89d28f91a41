"""DiT model configuration and the named sizes (DiT-S/2 … DiT-XL/8)."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

SIZES = {  # name: (depth, hidden_size, num_heads), facebookresearch/DiT models.py
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
ARCHS = {f"DiT-{size}/{p}": (size, p) for size in SIZES for p in (2, 4, 8)}
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Everything that fixes a DiT's parameters and computation."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    param_dtype: str = "float32"
    dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_backend: str = "xla"
    mlp_type: str = "dense"
    attn_scale: float | None = None  # None: head_dim**-0.5 (DiT); μP may override
    readout_scale: float = 1.0  # multiplies the final linear's input (μP output multiplier / width)

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def validate(self) -> "DiTConfig":
        """Raise one clear ValueError per impossible setting, before anything is built or compiled."""
        from ditjax.models.attention import BACKENDS
        from ditjax.models.mlp import MLP_TYPES

        checks = [
            (self.hidden_size % self.num_heads == 0,
             f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}"),
            (self.hidden_size % 4 == 0, f"model.hidden_size={self.hidden_size} must be divisible by 4 (2-D sin-cos)"),
            (self.input_size % self.patch_size == 0,
             f"model.input_size={self.input_size} is not divisible by model.patch_size={self.patch_size}"),
            (min(self.depth, self.hidden_size, self.num_heads, self.patch_size, self.in_channels) > 0,
             "model depth, hidden_size, num_heads, patch_size and in_channels must be positive"),
            (self.num_classes > 0, f"model.num_classes={self.num_classes} must be positive"),
            (0.0 <= self.class_dropout_prob < 1.0, f"model.class_dropout_prob={self.class_dropout_prob} not in [0, 1)"),
            (self.param_dtype in DTYPES, f"model.param_dtype={self.param_dtype!r} not in {list(DTYPES)}"),
            (self.dtype in DTYPES, f"model.dtype={self.dtype!r} not in {list(DTYPES)}"),
            (self.remat_policy in REMAT_POLICIES, f"model.remat_policy={self.remat_policy!r} not in {REMAT_POLICIES}"),
            (self.attention_backend in BACKENDS,
             f"model.attention_backend={self.attention_backend!r} not in {BACKENDS}"),
            (self.mlp_type in MLP_TYPES, f"model.mlp_type={self.mlp_type!r} not in {sorted(MLP_TYPES)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self


def dit_config(arch: str, **overrides: Any) -> DiTConfig:
    """Config of a named architecture ("DiT-XL/2"), with any field overridden (input_size, classes…)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")
    size, patch = ARCHS[arch]
    depth, hidden, heads = SIZES[size]
    fields = dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)
    return DiTConfig(**{**fields, **overrides}).validate()
