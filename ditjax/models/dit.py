"""DiT: a Diffusion Transformer with adaLN-Zero blocks (Peebles & Xie), numerically equal to
facebookresearch/DiT ``models.py``, in NHWC.

Beyond the reference, the model can scan its blocks (one compiled block for deep models),
rematerialise them, and return the hidden states and pre-softmax attention logits of chosen blocks
(REPA and HASTE alignment). Block indices are 0-based everywhere.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from ditjax.models.archs import DTYPES, DiTConfig
from ditjax.models.attention import Attention
from ditjax.models.embeddings import LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_pos_embed_2d
from ditjax.models.layers import Dense, layer_norm, modulate, zeros
from ditjax.models.mlp import make_mlp
from ditjax.parallel.logical import constrain

ACTIVATION_AXES = ("batch", "tokens", "embed")
REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@struct.dataclass
class ModelOutput:
    """The prediction plus what auxiliary losses need (all optional, empty unless requested)."""

    output: jax.Array  # NHWC, out_channels
    hidden: dict[int, jax.Array]  # block index → tokens [B, T, D] after that block
    attn_logits: dict[int, jax.Array]  # block index → pre-softmax logits [B, heads, T, T] (float32)
    aux_loss: jax.Array  # sum of MLP-slot auxiliary losses (MoE load balance); 0 for dense


def _residual(x: jax.Array) -> jax.Array:
    """Materialise the residual stream, and (the barrier's transpose) its gradient in the backward pass.

    Without it XLA:CPU fuses the gradient's running sum over all blocks into each transposing copy
    that feeds a weight-gradient matmul, recomputing it there: 60% of a DiT-S fp32 step on oneDNN.
    """
    return jax.lax.optimization_barrier(x)


class DiTBlock(nnx.Module):
    """x += g1·Attn(mod(LN x)); x += g2·MLP(mod(LN x)), with (shift, scale, gate)×2 from adaLN(c)."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, param_dtype=DTYPES[cfg.param_dtype], dtype=DTYPES[cfg.dtype])
        d = cfg.hidden_size
        self.attn = Attention(d, cfg.num_heads, backend=cfg.attention_backend, scale=cfg.attn_scale, **kw)
        self.mlp = make_mlp(cfg.mlp_type, d, cfg.mlp_hidden, **kw)
        self.modulation = Dense(d, 6 * d, in_axes=("embed",), out_axes=("adaln",), kernel_init=zeros, **kw)

    def __call__(self, x: jax.Array, c: jax.Array, return_logits: bool = False):
        sh1, sc1, g1, sh2, sc2, g2 = jnp.split(self.modulation(nnx.silu(c)), 6, axis=-1)
        attn_out, logits = self.attn(modulate(layer_norm(x), sh1, sc1), return_logits)
        x = _residual(constrain(x + g1[:, None] * attn_out, ACTIVATION_AXES))
        mlp_out, aux = self.mlp(modulate(layer_norm(x), sh2, sc2))
        return _residual(constrain(x + g2[:, None] * mlp_out, ACTIVATION_AXES)), aux, logits


class FinalLayer(nnx.Module):
    """adaLN(shift, scale) → LayerNorm → Linear to p²·C_out, zero-initialised."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, param_dtype=DTYPES[cfg.param_dtype], dtype=DTYPES[cfg.dtype], kernel_init=zeros)
        d, p = cfg.hidden_size, cfg.patch_size
        self.modulation = Dense(d, 2 * d, in_axes=("embed",), out_axes=("adaln",), **kw)
        self.linear = Dense(d, p * p * cfg.out_channels, in_axes=("embed",), out_axes=(None,), **kw)
        self.readout_scale = cfg.readout_scale

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.modulation(nnx.silu(c)), 2, axis=-1)
        x = modulate(layer_norm(x), shift, scale)
        if self.readout_scale != 1.0:
            x = x * self.readout_scale
        return self.linear(x)


def _make_blocks(cfg: DiTConfig, rngs: nnx.Rngs) -> nnx.Module:
    """A list of blocks, or one block whose parameters carry a leading ``layers`` axis (scanned)."""
    if not cfg.scan_layers:
        return nnx.List([DiTBlock(cfg, rngs=rngs) for _ in range(cfg.depth)])

    @nnx.split_rngs(splits=cfg.depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def stacked(rngs: nnx.Rngs) -> DiTBlock:
        return DiTBlock(cfg, rngs=rngs)

    blocks = stacked(rngs)
    for _, variable in nnx.iter_graph(blocks):
        if isinstance(variable, nnx.Param):
            variable.set_metadata("axes", ("layers",) + variable.get_metadata()["axes"])
    return blocks


class DiT(nnx.Module):
    """Class-conditional Diffusion Transformer on NHWC latents or pixels."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        kw = dict(rngs=rngs, param_dtype=DTYPES[cfg.param_dtype], dtype=DTYPES[cfg.dtype])
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, cfg.hidden_size, **kw)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size, **kw)
        self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.hidden_size, cfg.class_dropout_prob, **kw)
        self.blocks = _make_blocks(cfg, rngs)
        self.final_layer = FinalLayer(cfg, rngs=rngs)

    def pos_embed(self) -> jax.Array:
        """Fixed positions, rebuilt from the config (a constant folded by XLA, never a parameter)."""
        grid = self.cfg.input_size // self.cfg.patch_size
        return jnp.asarray(sincos_pos_embed_2d(self.cfg.hidden_size, grid), DTYPES[self.cfg.dtype])

    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, *, label_drop_key: jax.Array | None = None,
                 force_drop_ids: jax.Array | None = None, capture_hidden: Sequence[int] = (),
                 capture_logits: Sequence[int] = ()) -> ModelOutput:
        """x: [B, H, W, C]; t: [B] (DDPM index or flow time, as the objective feeds it); y: [B] labels.

        ``label_drop_key`` enables the train-time label drop for classifier-free guidance.
        """
        cfg = self.cfg
        expected = (cfg.input_size, cfg.input_size, cfg.in_channels)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"input shape {tuple(x.shape)} does not match the model: expected [B, *{expected}]")
        for name, idx in (("capture_hidden", capture_hidden), ("capture_logits", capture_logits)):
            if any(not 0 <= i < cfg.depth for i in idx):
                raise ValueError(f"{name}={tuple(idx)} has block indices outside [0, {cfg.depth})")
        dtype = DTYPES[cfg.dtype]
        h = constrain(self.x_embedder(x.astype(dtype)) + self.pos_embed()[None], ACTIVATION_AXES)
        y = self.y_embedder.drop(y, label_drop_key, force_drop_ids)
        c = self.t_embedder(t) + self.y_embedder(y)
        h, aux, hidden, logits = self._run_blocks(h, c, set(capture_hidden), set(capture_logits))
        out = self.final_layer(h, c)
        return ModelOutput(output=self._unpatchify(out), hidden=hidden, attn_logits=logits, aux_loss=aux)

    def _unpatchify(self, tokens: jax.Array) -> jax.Array:
        cfg = self.cfg
        b, g, p, c = tokens.shape[0], cfg.input_size // cfg.patch_size, cfg.patch_size, cfg.out_channels
        x = tokens.reshape(b, g, g, p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, g * p, g * p, c)

    def _block_fn(self, graphdef: nnx.GraphDef, return_logits: bool) -> Callable:
        """Pure (state, h, c) → (h, aux, logits) for one block, rematerialised per config."""

        def apply(state, h, c):
            return nnx.merge(graphdef, state)(h, c, return_logits)

        policy = REMAT.get(self.cfg.remat_policy)
        return apply if policy is None else jax.checkpoint(apply, policy=policy, static_argnums=())

    def _run_blocks(self, h: jax.Array, c: jax.Array, capture_hidden: set[int], capture_logits: set[int]):
        aux_total = jnp.zeros((), jnp.float32)
        hidden: dict[int, jax.Array] = {}
        logits: dict[int, jax.Array] = {}
        if not self.cfg.scan_layers:
            for i, block in enumerate(self.blocks):
                graphdef, state = nnx.split(block)
                h, aux, lg = self._block_fn(graphdef, i in capture_logits)(state, h, c)
                aux_total += aux
                if lg is not None:
                    logits[i] = lg
                if i in capture_hidden:
                    hidden[i] = h
            return h, aux_total, hidden, logits

        # Scanned: split the depth into segments at every captured block; each segment is one scan.
        graphdef, state = nnx.split(self.blocks)
        cuts = {self.cfg.depth} | {i + 1 for i in capture_hidden | capture_logits} | set(capture_logits)
        start = 0
        for end in sorted(cuts):
            if end <= start:
                continue
            segment = jax.tree.map(lambda a: a[start:end], state)
            if start in capture_logits:  # a single block whose logits are returned
                h, aux, lg = self._block_fn(graphdef, True)(jax.tree.map(lambda a: a[0], segment), h, c)
                logits[start] = lg
            else:
                body = self._block_fn(graphdef, False)

                def step(carry, layer_state, body=body):
                    carry, aux, _ = body(layer_state, carry, c)
                    return carry, aux

                h, aux = jax.lax.scan(step, h, segment)
                aux = aux.sum()
            aux_total += aux
            if end - 1 in capture_hidden:
                hidden[end - 1] = h
            start = end
        return h, aux_total, hidden, logits
