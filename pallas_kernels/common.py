"""Block sizes, padding and input checks shared by the TPU and GPU flash-attention kernels.

Both kernels take [B, L, H, D] inputs. Each pads the head dim with zeros to its hardware tile
(exact, because the softmax scale always uses the true D and the padded output columns are sliced
off) and handles a ragged sequence length by masking keys at or beyond L.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

LOG2E = math.log2(math.e)
# The GPU kernels keep two resident tiles plus a two-stage K/V (or Q/dO) pipeline in shared memory,
# which fits the 227 KiB of an H100 only up to D=128.
MAX_HEAD_DIM = {"tpu": 256, "gpu": 128}
# Padded head-dim granularity: the TPU lane width; on GPU the 16-element bf16 swizzle atom
# (72 -> 80 instead of 128: 1.6x less MMA work than padding to a power of two).
HEAD_DIM_ALIGN = {"tpu": 128, "gpu": 16}
DTYPES = {"tpu": (jnp.float32, jnp.bfloat16), "gpu": (jnp.bfloat16, jnp.float16)}
PLATFORM_BACKEND = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "cpu": "tpu"}


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (rows of the sequence) of the forward, dQ and dK/dV kernels.

    `block_q`/`block_kv` tile the forward; `block_q_dq`/`block_kv_dq` the dQ kernel (which streams
    keys); `block_q_dkv`/`block_kv_dkv` the dK/dV kernel (which streams queries). On TPU every size
    must be a multiple of 128 (the lane width: key blocks are the lane dim of the logits). On GPU the
    resident side of each kernel (`block_q`, `block_q_dq`, `block_kv_dkv`) is the 64 rows one
    warpgroup owns in a wgmma, the streamed side is a multiple of 64, and `num_stages` is the
    depth of the TMA pipeline (unused on TPU, which double-buffers by itself).
    """

    block_q: int = 128
    block_kv: int = 128
    block_q_dq: int = 128
    block_kv_dq: int = 128
    block_q_dkv: int = 128
    block_kv_dkv: int = 128
    num_stages: int = 2

    @classmethod
    def default(cls, backend: str, seq_len: int) -> BlockSizes:
        """Defaults before autotuning: large tiles on TPU (128 is too small for v5e, jax#24633)."""
        if backend == "gpu":  # 128-row streamed tiles in the backward overflow SMEM at D=128
            return cls(64, 128, 64, 64, 64, 64, 2)
        tile = min(512, round_up(seq_len, 128))
        return cls(tile, tile, tile, tile, tile, tile, 2)

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def resolve_backend(backend: str | None) -> str:
    """'gpu' or 'tpu'; auto picks the platform's kernel, and on CPU the TPU kernel (interpreted)."""
    if backend is None:
        backend = PLATFORM_BACKEND.get(jax.default_backend())
    if backend not in ("gpu", "tpu"):
        raise ValueError(f"backend must be None, 'gpu' or 'tpu', got {backend!r}")
    return backend


def check_inputs(q: jax.Array, k: jax.Array, v: jax.Array, backend: str) -> None:
    """Raise ValueError for anything the kernels would otherwise compute wrongly."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"expected [B, L, H, D] inputs, got shapes {q.shape}, {k.shape}, {v.shape}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must share one shape (self-attention, no GQA): {q.shape}, {k.shape}, {v.shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    ok, reason = _supports_shape_dtype(q.shape, q.dtype, backend)
    if not ok:
        raise ValueError(reason)


def _supports_shape_dtype(q_shape: tuple[int, ...], dtype, backend: str) -> tuple[bool, str]:
    if len(q_shape) != 4:
        return False, f"expected a [B, L, H, D] shape, got {tuple(q_shape)}"
    head_dim = q_shape[-1]
    if not 0 < head_dim <= MAX_HEAD_DIM[backend]:
        return False, f"head dim {head_dim} outside (0, {MAX_HEAD_DIM[backend]}] for the {backend} kernel"
    if q_shape[1] < 1 or q_shape[0] < 1 or q_shape[2] < 1:
        return False, f"empty shape {tuple(q_shape)}"
    allowed = DTYPES[backend]
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in allowed]:
        names = ", ".join(jnp.dtype(d).name for d in allowed)
        return False, f"dtype {jnp.dtype(dtype).name} unsupported by the {backend} kernel (supports {names})"
    return True, ""


def supports(q_shape: tuple[int, ...], dtype, platform: str) -> tuple[bool, str]:
    """Whether the model should use our kernel on `platform` ('gpu'/'tpu'/'cpu'); else why not.

    CPU answers False: the kernels run there only in interpret mode, for tests. GPU needs a Hopper
    (sm_90) device because the kernel is built on wgmma; fp32 is refused on GPU because wgmma would
    round it to tf32, which misses our fp32 accuracy contract.
    """
    if platform == "cpu":
        return False, "Pallas kernels run on CPU only in interpret mode (tests); use XLA"
    backend = PLATFORM_BACKEND.get(platform)
    if backend is None:
        return False, f"no kernel for platform {platform!r}"
    ok, reason = _supports_shape_dtype(q_shape, dtype, backend)
    if ok and backend == "gpu":
        ok, reason = _is_hopper()
    return ok, reason


def _is_hopper() -> tuple[bool, str]:
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        return False, "no GPU device visible to jax"
    kinds = {getattr(d, "compute_capability", None) for d in devices}
    if kinds != {"9.0"}:
        return False, f"GPU kernel needs compute capability 9.0 (H100/H200), found {sorted(map(str, kinds))}"
    return True, ""


def pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    """Zero-pad `axis` of x up to `size` (no copy when already that size)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def default_scale(head_dim: int) -> float:
    """1/sqrt(D) with the TRUE head dim, never the padded one."""
    return 1.0 / float(np.sqrt(head_dim))
