"""The decoder: embedding, a scanned stack of dense-FFN blocks, a scanned stack of MoE blocks,
final norm, output head, and the MTP modules. The same class is the dense R1-Distill student
(GQA attention, every FFN dense) when the config says so.

Each block (and MTP layer) has its training form (`__call__`) and, beside it, the cached form
the sampler runs (`cached`: the attention over a cache it writes through a `cache_io` callable,
see `MLA.cached`); `r1jax.sampling` owns the cache storage and the walk over the stacks.

Letters: B batch, T length, D width, V vocab, E experts, M MTP depth.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct

from r1jax.config import ModelConfig
from r1jax.model.gqa import GQA
from r1jax.model.layers import MLP, RMSNorm, dtypes, normal, param
from r1jax.model.mla import MLA
from r1jax.model.moe import MoE
from r1jax.parallel.rules import constrain


@struct.dataclass
class ModelOutput:
    logits: jax.Array  # [B, T, V]
    mtp_logits: jax.Array | None  # [M, B, T, V]: depth k predicts the token k+1 after `targets`
    expert_loads: jax.Array | None  # [L_moe, E] tokens routed to each expert, per MoE layer
    balance_loss: jax.Array  # [] sequence-wise balance loss summed over MoE layers (alpha included)
    hidden: jax.Array  # [B, T, D] last hidden state before the final norm (what MTP consumes)
    mtp_expert_loads: jax.Array | None = None  # [M, E] loads of the MTP blocks' MoE
    moe_metrics: dict[str, Any] = struct.field(default_factory=dict)  # dispatch metrics [L_moe]


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + ffn(norm(x)); ffn is MLP or MoE."""

    def __init__(self, cfg: ModelConfig, *, moe: bool, rngs: nnx.Rngs):
        _, pdt = dtypes(cfg)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pdt, rngs=rngs)
        self.attn = MLA(cfg, rngs=rngs) if cfg.is_mla else GQA(cfg, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pdt, rngs=rngs)
        self.ffn = MoE(cfg, rngs=rngs) if moe else MLP(cfg, cfg.intermediate_size, rngs=rngs)

    def __call__(self, x, positions, segment_ids) -> tuple[jax.Array, dict]:
        x = x + self.attn(self.input_norm(x), positions, segment_ids)
        h = self.post_attn_norm(x)
        if isinstance(self.ffn, MoE):
            y, stats = self.ffn(h, segment_ids > 0)  # segment 0: padding
        else:
            y, stats = self.ffn(h), {}
        return constrain(x + y, ("batch", "length", "embed")), stats

    def decode_layout(self) -> dict:
        """The block's (or a stack's, leading layers axis) weights rearranged for the per-layer
        single-device decode (`MLA.decode_layout`, `MoE.decode_layout`): passed back to `cached`
        as its layout."""
        ffn = self.ffn.decode_layout() if isinstance(self.ffn, MoE) else {}
        return {**self.attn.decode_layout(), **ffn}

    def cached(self, x, positions, cache_io: Callable, *, absorbed: bool = True,
               layout: dict | None = None) -> tuple[jax.Array, Any]:
        """`__call__` over this layer's cache: x [B,T,D] at positions [B,T] -> (x [B,T,D], the
        updated cache arrays). cache_io, absorbed: see `MLA.cached`; layout: `decode_layout`
        arrays (the per-layer decode), or None."""
        layout = layout or {}
        a, written = self.attn.cached(self.input_norm(x), positions, cache_io, absorbed=absorbed, layout=layout)
        x = x + a
        h = self.post_attn_norm(x)
        y = self.ffn.decode(h, layout) if isinstance(self.ffn, MoE) else self.ffn(h)
        return constrain(x + y, ("batch", "length", "embed")), written


def stacked_blocks(cfg: ModelConfig, count: int, *, moe: bool, rngs: nnx.Rngs) -> Block | None:
    """`count` blocks with their parameters stacked on a leading `layers` axis, for `scan_blocks`."""
    if count == 0:
        return None

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers", "axes": "layers"})
    def make(rngs: nnx.Rngs) -> Block:
        return Block(cfg, moe=moe, rngs=rngs)

    return make(rngs)


_REMAT_POLICIES = {
    "full": None,
    "save_dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def scan_blocks(blocks: Block, x, positions, segment_ids, remat: str, unroll: int = 1) -> tuple[jax.Array, dict]:
    """Runs a stacked `Block` over its layers with `lax.scan`: one compiled body for all layers."""
    graphdef, state = nnx.split(blocks)

    def body(x, layer_state):
        return nnx.merge(graphdef, layer_state)(x, positions, segment_ids)

    if remat != "none":
        body = jax.checkpoint(body, policy=_REMAT_POLICIES[remat], prevent_cse=False)
    return jax.lax.scan(body, x, state, unroll=unroll)


class MTPLayer(nnx.Module):
    """Multi-Token Prediction depth k: h' = eh_proj [enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)], one
    block, then its own final norm before the shared head (released names kept)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        _, pdt = dtypes(cfg)
        d = cfg.hidden_size
        self.enorm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=pdt, rngs=rngs)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=pdt, rngs=rngs)
        self.eh_proj = param(rngs, normal(cfg.initializer_range), (2 * d, d), (None, "embed"), pdt)
        self.block = Block(cfg, moe=cfg.is_moe, rngs=rngs)
        self.norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=pdt, rngs=rngs)

    def join(self, h_prev, next_embeds) -> jax.Array:
        """h_prev, next_embeds [B,T,D] -> the block's input [B,T,D]."""
        joined = jnp.concatenate([self.enorm(next_embeds), self.hnorm(h_prev)], axis=-1)
        return jnp.einsum("BTC,CD->BTD", joined, self.eh_proj[...].astype(h_prev.dtype))

    def __call__(self, h_prev, next_embeds, positions, segment_ids) -> tuple[jax.Array, jax.Array, dict]:
        """h_prev, next_embeds [B,T,D] -> (h [B,T,D] for the next depth, normed h for the head, stats)."""
        h, stats = self.block(self.join(h_prev, next_embeds), positions, segment_ids)
        return h, self.norm(h), stats

    def cached(self, h_prev, next_embeds, positions, cache_io: Callable, *, absorbed: bool = True,
               layout: dict | None = None) -> tuple[jax.Array, jax.Array, Any]:
        """`__call__` over this layer's cache (`Block.cached`) -> (h, normed h, the updated cache
        arrays). layout: the block's `decode_layout` arrays, or None."""
        h, written = self.block.cached(self.join(h_prev, next_embeds), positions, cache_io, absorbed=absorbed,
                                       layout=layout)
        return h, self.norm(h), written


class Decoder(nnx.Module):
    """DeepSeek-V3 (MLA + MoE + MTP), V2 (MLA + MoE) or a dense GQA student, by config."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype, pdt = dtypes(cfg)
        init = normal(cfg.initializer_range)
        self.embed = param(rngs, init, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pdt)
        self.dense_layers = stacked_blocks(cfg, cfg.num_dense_layers, moe=False, rngs=rngs)
        self.moe_layers = stacked_blocks(cfg, cfg.num_moe_layers, moe=True, rngs=rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pdt, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, init, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pdt)
        self.mtp = nnx.List([MTPLayer(cfg, rngs=rngs) for _ in range(cfg.num_nextn_predict_layers)])

    def embed_tokens(self, ids: jax.Array) -> jax.Array:
        x = jnp.take(self.embed[...], ids, axis=0).astype(self.dtype)
        return constrain(x, ("batch", "length", "embed"))

    def head(self, h: jax.Array) -> jax.Array:
        """Normed hidden [B,T,D] -> logits [B,T,V] in f32."""
        w = self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]
        logits = jnp.einsum("BTD,DV->BTV", h, w.astype(self.dtype), preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "length", "vocab"))

    def __call__(self, input_ids, positions=None, segment_ids=None, *, mtp_inputs=None) -> ModelOutput:
        """input_ids [B,T] -> logits. positions default to 0..T-1, segment_ids to one segment.

        `mtp_inputs` [B,T]: the token after each input (the training targets); needed for MTP
        logits, since depth k embeds token i+k. Positions whose future token lies in another
        segment or past the row get meaningless MTP logits: the loss masks them.
        """
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        x = self.embed_tokens(input_ids)
        remat, unroll = self.cfg.remat, self.cfg.scan_unroll
        if self.dense_layers is not None:
            x, _ = scan_blocks(self.dense_layers, x, positions, segment_ids, remat, unroll)
        loads, balance, metrics = None, jnp.zeros((), jnp.float32), {}
        if self.moe_layers is not None:
            x, stats = scan_blocks(self.moe_layers, x, positions, segment_ids, remat, unroll)
            loads, balance = stats.pop("loads"), stats.pop("balance_loss").sum()
            metrics = stats
        logits = self.head(self.norm(x))
        mtp_logits = mtp_loads = None
        if len(self.mtp) and mtp_inputs is not None:
            h, tokens, outs, mtp_loads = x, mtp_inputs, [], []
            for layer in self.mtp:
                h, normed, stats = layer(h, self.embed_tokens(tokens), positions, segment_ids)
                outs.append(self.head(normed))
                if "loads" in stats:
                    balance = balance + stats["balance_loss"]
                    mtp_loads.append(stats["loads"])
                tokens = jnp.roll(tokens, -1, axis=1)  # depth k+1 embeds the token one further on
            mtp_logits = jnp.stack(outs)
            mtp_loads = jnp.stack(mtp_loads) if mtp_loads else None
        return ModelOutput(logits, mtp_logits, loads, balance, x, mtp_loads, metrics)


def abstract_decoder(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, params, extra) of a `Decoder` of `cfg` as shapes and dtypes: what inference
    loads weights into (no optimizer), nothing allocated."""
    return nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)
