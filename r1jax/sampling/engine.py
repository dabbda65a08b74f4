"""Sampling: cached prefill and decode as small free functions, and a continuous-batching engine.

    completions = generate(model, prompts, SamplingParams(temperature=0.6, top_p=0.95, max_tokens=512), n=8)

    engine = Engine(model, slots=16, max_len=4096, tokenizer=tok)    # a server thread drives this
    engine.add_request("r1", prompt_ids, SamplingParams(...), on_token=callback)
    while engine.has_work():
        engine.step()            # admits waiting requests, then up to decode_chunk tokens for every active slot

Letters: B slots (batch rows), T new tokens per row, S cache length, D width, H heads, N nope dim,
R rope dim, L kv_lora rank, V value head dim / vocab (by context), G kv heads, J query heads per
kv head, K head dim.

How it runs (gpt-fast style): the cache (`r1jax.sampling.cache`) is static, the compiled
functions write it in place (donated), and only three functions are compiled: `prefill` (once
per (rows, length) bucket: prompts are right-padded to a power of two, longer ones run in
chunks of `prefill_chunk`), the hot decode loop, and a row copy (once). The decode loop runs
up to `decode_chunk` decode + sample steps on device per call (a `while_loop`; a row stops on a
stop token, max_tokens or a full cache row, the loop as soon as every row has), attending over
a power-of-two prefix of the cache rows that holds the chunk (compiled once per such bucket, and
per power of two of stop ids). The host reads back [B, decode_chunk] tokens and log-probs and a
[B] count per call, nothing else, emits the chunk's events, checks stop strings (a request that
hits one mid-chunk drops the rest), and admits new requests between calls. Each layer
writes its new cache entries and then reads its prefix back (in place, see `_layer_cache`);
16-bit caches are written as their uint16 bits (see `_bits`).

MLA decode is "absorbed" (spec §2): W_kvb's key half folds into the query
(q_lat = q_nope · W_kb, [B,H,L]), attention scores are q_lat · c_kv + q_rope · k_rope over the
cached latent, the output stays in latent space (probs · c_kv) until W_kvb's value half and
`wo` map it out. Nothing per head is rebuilt from the cache. Prefill (many query tokens) uses
the training form, with K/V rebuilt from the latent, which costs fewer FLOPs there; so does
`naive_decode_step`, kept for tests.

Sampling: greedy (temperature 0), temperature, top-k, top-p; each slot draws one uniform from
key = fold_in(fold_in(key(seed), sample_index), token_index) (`r1jax.sampling.rng`, bit for bit
`jax.random`), so a request's tokens depend on its seed and its own logits only, never on what
it is batched with. Log-probs are those of the distribution actually sampled from (after
temperature, top-k, top-p); for greedy requests, the model's own log-prob of the argmax token
(temperature 1, no truncation).

`n` samples of one prompt (and any identical prompts admitted together) are prefilled once:
the cache rows are copied to the other slots, then each samples its own continuation.

On a single CPU device the engine keeps a per-layer copy of the stacks' weights
(`Weights.unstacked`: XLA:CPU copies whatever a dot reads from a slice of a stacked array, so a
scanned step would copy every layer's weights first), with W_kvb's halves stored heads-first for
the absorbed dots and tiny experts, with the shared one, as one dense matrix pair
(`_decode_layout`), and runs its layers one after another instead of scanning. Its decode runs
the routed experts of its few tokens with `small_batch_experts` (gathered pairs, per-expert
buckets or every expert, by size), or tiny ones past the pairs range as `dense_moe`. Sampling's
per-token hashes are unrolled (`rng`), and its argmax is two plain reductions. Together (a
faster CPU than today's, f32, against the scanned stack): small-moe batch 1 15.9 -> ~28-32
tokens/s, batch 16 61 -> ~120; tiny-moe batch 1 1,453 -> ~2,800, batch 16 7,944 -> ~12,500,
64 slots ~9,500 -> ~15,000. On CPU every compiled step is built without XLA's YNNPACK fusions
(`sampling_jit`).

Departures / left out: no prefix cache across admissions, no paged cache (one max_len row per
slot), no pipelining of host bookkeeping with the next device call.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
import secrets
from typing import Any, Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from r1jax.config import ModelConfig
from r1jax.model.decoder import Decoder
from r1jax.model.layers import attend
from r1jax.model.mla import MLA
from r1jax.model.moe import MoE, current_expert_fn, dense_moe, dense_moe_weights, small_batch_experts, use_expert_fn
from r1jax.parallel import rules as rules_lib
from r1jax.parallel.rules import MeshAxes, constrain
from r1jax.sampling.cache import Cache, cache_shardings, init_cache
from r1jax.sampling.rng import slot_uniforms

# ----------------------------------------------------------------------------- parameters


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None  # None: a fresh random seed per request
    max_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings, checked on the decoded text (needs a tokenizer)


@dataclasses.dataclass
class Completion:
    token_ids: list[int]  # generated tokens, a final stop token included
    logprobs: list[float]  # one per token
    finish_reason: str  # "stop" | "length"
    text: str | None = None  # decoded (stop token / stop string excluded) when a tokenizer was given


@dataclasses.dataclass(frozen=True)
class Event:
    request_id: Hashable
    token_id: int
    logprob: float
    finish_reason: str | None  # set on a request's last event


@dataclasses.dataclass(frozen=True)
class Weights:
    """A decoder as (graphdef, params, extra): what the compiled functions take. Built from a
    `Decoder` or a train state without copying any array."""

    graphdef: Any
    params: Any
    extra: Any
    layers: Any = None  # {stack: ((layer state, `_decode_layout`), ...)} of `unstacked()`; None: scan

    @classmethod
    def of(cls, model_or_state) -> "Weights":
        if isinstance(model_or_state, Weights):
            return model_or_state
        if isinstance(model_or_state, nnx.Module):
            return cls(*nnx.split(model_or_state, nnx.Param, ...))
        if isinstance(model_or_state, (tuple, list)):
            if len(model_or_state) == 3:
                return cls(*model_or_state)
            if len(model_or_state) == 2:  # (graphdef, TrainState)
                graphdef, state = model_or_state
                return cls(graphdef, state.params, state.extra)
        raise TypeError("expected a Decoder, (graphdef, params, extra) or (graphdef, TrainState)")

    @property
    def cfg(self) -> ModelConfig:
        return nnx.merge(self.graphdef, self.params, self.extra).cfg

    def model(self) -> Decoder:
        return nnx.merge(self.graphdef, self.params, self.extra)

    def unstacked(self) -> "Weights":
        """These weights plus a copy of every layer of the stacks as arrays of their own, for the
        single-device CPU forward (`forward_cached` loops over them instead of scanning). XLA:CPU
        copies whatever a dot reads from a slice of a stacked array, so a scanned decode step
        copies every layer's weights first; with arrays of their own it reads them in place
        (small-moe shapes: 12 [768, 3072] matvecs 9.5 ms scanned, 3.9 ms unstacked).
        Costs a second copy of the stacks' weights."""
        return dataclasses.replace(self, layers=_unstack(self.graphdef, self.params, self.extra))


_STACKS = ("dense_layers", "moe_layers")


@jax.jit
def _unstack_states(stacks: dict) -> dict:
    return {k: tuple(jax.tree.map(lambda a, i=i: a[i], st) for i in range(jax.tree.leaves(st)[0].shape[0]))
            for k, st in stacks.items()}


def _decode_layout(blocks) -> dict:
    """A block's (or a stack's, leading Y) arrays in the layouts the per-layer decode reads:
    W_kvb's halves heads-first, k [Y,H,N,L], v [Y,H,L,V] (stored [Y,L,H,N] / [Y,L,H,V]: XLA:CPU
    would transpose both at every step, ~15% of small-moe's decode at batch 1; none for GQA);
    routed experts of at most 2^18 weights each, with the shared expert, as `dense_moe_weights`
    ("experts", see `_ffn`; tiny-moe: ~1.7 MB a layer)."""
    out = {}
    if isinstance(blocks.attn, MLA):
        out["k"] = jnp.moveaxis(blocks.attn.wkv_b_k[...], -3, -1)
        out["v"] = jnp.swapaxes(blocks.attn.wkv_b_v[...], -3, -2)
    ffn = blocks.ffn
    if isinstance(ffn, MoE) and math.prod(ffn.w_gate.shape[-3:]) <= 1 << 18:
        shared = (ffn.shared.gate_proj[...], ffn.shared.up_proj[...], ffn.shared.down_proj[...]) \
            if ffn.cfg.n_shared_experts else None
        fn = dense_moe_weights if ffn.w_gate.ndim == 3 else jax.vmap(dense_moe_weights)
        out["experts"] = fn(*ffn.expert_weights(), shared)
    return out


def _unstack(graphdef, params, extra) -> dict:
    """{stack: ((layer state, `_decode_layout` arrays), ...)} for `Weights.layers`."""
    model = nnx.merge(graphdef, params, extra)
    stacks = {k: getattr(model, k) for k in _STACKS if getattr(model, k) is not None}
    return _unstack_states({k: (nnx.state(b), _decode_layout(b)) for k, b in stacks.items()})


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where the compiled functions run: a mesh and rules table (activations), the expert
    dispatch. Hashable: a static argument of the compiled functions."""

    mesh: Mesh | None = None
    rules: tuple[tuple[str, MeshAxes], ...] = ()
    capacity_factor: float | None = None

    @contextlib.contextmanager
    def active(self):
        if self.mesh is None:
            yield
            return
        from r1jax.parallel.expert import make_expert_fn

        rules = dict(self.rules)
        mode = "dropless" if self.capacity_factor is None else "capacity"
        fn = make_expert_fn(self.mesh, rules, mode=mode, capacity_factor=self.capacity_factor)
        with rules_lib.use_rules(self.mesh, rules), use_expert_fn(fn):
            yield

    def constrain_cache(self, cache: Cache, cfg: ModelConfig) -> Cache:
        """Keeps the cache in its own layout from step to step (no resharding, no recompiles)."""
        if self.mesh is None:
            return cache
        sh = cache_shardings(cfg, cache.slots, cache.max_len, self.mesh, dict(self.rules), "mtp" in cache.stacks)
        return jax.lax.with_sharding_constraint(cache, sh)


# ----------------------------------------------------------------------------- cached forward


def _mask(positions: jax.Array, s: int) -> jax.Array:
    """[B,T] query positions -> [B,1,T,S]: cache entry s is visible iff s <= the query position."""
    return (jnp.arange(s)[None, None, :] <= positions[:, :, None])[:, None]


def mla_absorbed(attn: MLA, q_nope, q_rope, c, k_rope, mask, layout: dict | None = None) -> jax.Array:
    """Attention over the latent. q_nope [B,T,H,N], q_rope [B,T,H,R], c [B,S,L], k_rope [B,S,R],
    mask [B,1,T,S] -> [B,T,D]. layout (`_decode_layout`): W_kvb's halves as k [H,N,L], v [H,L,V]."""
    dt = attn.dtype
    if layout and "k" in layout:
        q_lat = jnp.einsum("BTHN,HNL->BTHL", q_nope, layout["k"].astype(dt))
    else:
        q_lat = jnp.einsum("BTHN,LHN->BTHL", q_nope, attn.wkv_b_k[...].astype(dt))
    b, t, h, _ = q_lat.shape
    # (T, H) as one axis G: one batched dot over B each, which XLA:CPU runs without the
    # transposes a separate T axis costs once T > 1 (speculative verification).
    logits = jnp.einsum("BGL,BSL->BGS", q_lat.reshape(b, t * h, -1), c, preferred_element_type=jnp.float32)
    logits += jnp.einsum("BGR,BSR->BGS", q_rope.reshape(b, t * h, -1), k_rope, preferred_element_type=jnp.float32)
    visible = jnp.broadcast_to(mask[:, 0, :, None, :], (b, t, h, mask.shape[-1])).reshape(b, t * h, -1)
    logits = jnp.where(visible, logits * attn.scale, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(dt)
    out_lat = jnp.einsum("BGS,BSL->BGL", probs, c).reshape(b, t, h, -1)
    if layout and "k" in layout:
        out = jnp.einsum("BTHL,HLV->BTHV", out_lat, layout["v"].astype(dt))
    else:
        out = jnp.einsum("BTHL,LHV->BTHV", out_lat, attn.wkv_b_v[...].astype(dt))
    return jnp.einsum("BTHV,HVD->BTD", out, attn.wo[...].astype(dt))


def mla_naive(attn: MLA, q_nope, q_rope, c, k_rope, mask) -> jax.Array:
    """The same attention with per-head K/V rebuilt from the latent (the training form)."""
    dt = attn.dtype
    k_nope = jnp.einsum("BSL,LHN->BSHN", c, attn.wkv_b_k[...].astype(dt))
    v = jnp.einsum("BSL,LHV->BSHV", c, attn.wkv_b_v[...].astype(dt))
    h = q_nope.shape[2]
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None, :], k_rope.shape[:2] + (h, k_rope.shape[-1]))], -1)
    out = attend(jnp.concatenate([q_nope, q_rope], -1), k, v, mask, attn.scale)
    return jnp.einsum("BTHV,HVD->BTD", out, attn.wo[...].astype(dt))


def gqa_cached(attn, q, k, v, mask) -> jax.Array:
    """q [B,T,H,K], cached k, v [B,S,G,K]; query head h reads kv head h // J."""
    b, t, h, kd = q.shape
    g = k.shape[2]
    qg = q.reshape(b, t, g, h // g, kd)
    logits = jnp.einsum("BTGJK,BSGK->BGJTS", qg, k, preferred_element_type=jnp.float32) * attn.scale
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("BGJTS,BSGK->BTGJK", probs, v).reshape(b, t, h, kd)
    return attn.output(out)


def _ffn_residual(block, x, a, layout: dict):
    """The rest of `Block.__call__` after the attention output a [B,T,D]."""
    x = x + a
    return constrain(x + _ffn(block.ffn, block.post_attn_norm(x), layout), ("batch", "length", "embed"))


def _ffn(ffn, h, layout: dict):
    """The block's FFN over h [B,T,D]. In the single-device decode (`small_batch_experts` in
    use), an MoE layer with a dense layout (`_decode_layout`) past the gathered-pairs range runs
    as `dense_moe`: the router, then two dots for the routed and shared experts together."""
    if isinstance(ffn, MoE):
        b, t, d = h.shape
        cfg = ffn.cfg
        if ("experts" in layout and current_expert_fn() is small_batch_experts
                and 2 * b * t * cfg.num_experts_per_tok >= cfg.n_routed_experts):
            flat = h.reshape(b * t, d)
            dense = layout["experts"]
            y = dense_moe(flat, ffn.routing(flat), dense["gate_up"], dense["down"], cfg.n_routed_experts,
                          cfg.moe_intermediate_size)
            return y.reshape(b, t, d)
        return ffn(h)[0]
    return ffn(h)


# One forward over the cache, for prefill chunks, decode steps and speculative verification.
# Each layer writes its new entries into the cache first and then reads its prefix (a static
# `s` entries per row) back, so every read of a cache array follows its last write and XLA
# updates the arrays in place. Reading first and writing after the stack left the last layer's
# reads unordered against the write whenever XLA saw the layers straight-line (unrolled scans,
# one-layer stacks, the per-layer path), and it then copied every such cache array at every
# decode step (5 MB a step for tiny-moe at 64 slots).


def _bits(a: jax.Array) -> jax.Array:
    """A 16-bit float array as its uint16 bits (others unchanged). XLA:CPU scatters into a bf16
    array by converting the whole array to f32 and back (a 2 MB cache: ~0.5 ms per write);
    into uint16 it writes in place."""
    return jax.lax.bitcast_convert_type(a, jnp.uint16) if a.dtype.itemsize == 2 else a


def _unbits(a: jax.Array, dtype) -> jax.Array:
    return jax.lax.bitcast_convert_type(a, dtype) if a.dtype != dtype else a


def _cached_attention(attn, h, positions, cache_io, absorbed: bool, layout: dict):
    """h [B,T,D] at positions [B,T] over one layer's cache -> (out [B,T,D], updated cache arrays).
    cache_io (`_layer_cache`): new entries {name: [B,T,...]} -> (the layer's cache prefix {name:
    [B,S,...]} with them written, the updated arrays). Entry s is visible to a query at position
    p iff s <= p."""
    if isinstance(attn, MLA):
        q_nope, q_rope = attn.queries(h, positions)
        new = dict(zip(("c_kv", "k_rope"), attn.latent(h, positions)))
    else:
        new = dict(zip(("k", "v"), attn.project_kv(h, positions)))
    seen, bits = cache_io(new)
    mask = _mask(positions, next(iter(seen.values())).shape[1])
    if not isinstance(attn, MLA):
        return gqa_cached(attn, attn.query(h, positions), seen["k"], seen["v"], mask), bits
    if absorbed:
        return mla_absorbed(attn, q_nope, q_rope, seen["c_kv"], seen["k_rope"], mask, layout), bits
    return mla_naive(attn, q_nope, q_rope, seen["c_kv"], seen["k_rope"], mask), bits


def block_cached(block, x, positions, cache_io, absorbed: bool, layout: dict | None = None):
    """`Block.__call__` over one layer's cache (see `_cached_attention`) -> (x [B,T,D], updated
    cache arrays). layout: the layer's `_decode_layout` arrays (per-layer decode), or None."""
    layout = layout or {}
    a, bits = _cached_attention(block.attn, block.input_norm(x), positions, cache_io, absorbed, layout)
    return _ffn_residual(block, x, a, layout), bits


def _layer_cache(bits: dict, i, rows, positions, s: int, dtype):
    """Layer i of a stack's bits arrays {name: [Y,slots,max_len,...]} -> cache_io: new entries
    {name: [B,T,...]} -> (entries [:s] of slots rows in new's dtype, read back after writing the
    new ones at (rows[b], positions[b,t]); the updated arrays). rows None: all slots; rows >=
    slots and positions >= max_len are dropped, rows >= slots read the last slot. i may be traced
    (the layer scan)."""
    idx = (jnp.arange(positions.shape[0]) if rows is None else rows)[:, None]

    def read(a):
        return a[i, :, :s] if rows is None else a[i, jnp.minimum(rows, a.shape[1] - 1), :s]

    def cache_io(new: dict):
        out = {k: a.at[i, idx, positions].set(_bits(new[k].astype(dtype)), mode="drop") for k, a in bits.items()}
        return {k: _unbits(read(a), dtype).astype(new[k].dtype) for k, a in out.items()}, out

    return cache_io


def _scan_stack(blocks, bits: dict, rows, x, positions, s: int, dtype, absorbed: bool, unroll: int = 1):
    """x [B,T,D] through a scanned stack that carries its bits arrays {name: [Y,slots,max_len,...]}
    and writes each layer's new entries before reading them back (`_layer_cache`) -> (x, bits)."""
    graphdef, state = nnx.split(blocks)

    def body(carry, layer_state):
        x, bits, i = carry
        x, bits = block_cached(nnx.merge(graphdef, layer_state), x, positions,
                               _layer_cache(bits, i, rows, positions, s, dtype), absorbed)
        return (x, bits, i + 1), None

    (x, bits, _), _ = jax.lax.scan(body, (x, bits, jnp.int32(0)), state, unroll=unroll)
    return x, bits


def _loop_stack(blocks, layer_states, bits: dict, rows, x, positions, s: int, dtype, absorbed: bool):
    """`_scan_stack` over per-layer (state, `_decode_layout`) pairs (`Weights.unstacked`), one
    block after another."""
    graphdef = nnx.graphdef(blocks)
    for i, (layer_state, layout) in enumerate(layer_states):
        x, bits = block_cached(nnx.merge(graphdef, layer_state), x, positions,
                               _layer_cache(bits, i, rows, positions, s, dtype), absorbed, layout)
    return x, bits


def forward_cached(model: Decoder, stacks: dict, tokens, positions, rows, s: int, dtype, absorbed: bool = True,
                   layer_states: dict | None = None):
    """tokens [B,T] at positions [B,T] into slots rows ([B]; None: all slots, B = slots) through
    the main stacks, attending over cache entries [:s] (static; must exceed every position) ->
    (hidden before the final norm [B,T,D], stacks with the new entries written). The stacks'
    arrays hold `dtype` values, 16-bit ones as their uint16 bits (`_bits`). layer_states
    (`Weights.layers`): run the stacks from those per-layer arrays instead of scanning."""
    stacks = dict(stacks)
    x = model.embed_tokens(tokens)
    for name, attr in (("dense", "dense_layers"), ("moe", "moe_layers")):
        blocks = getattr(model, attr)
        if blocks is None:
            continue
        if layer_states is not None:
            x, stacks[name] = _loop_stack(blocks, layer_states[attr], stacks[name], rows, x, positions, s, dtype,
                                          absorbed)
        else:
            x, stacks[name] = _scan_stack(blocks, stacks[name], rows, x, positions, s, dtype, absorbed,
                                          model.cfg.scan_unroll)
    return x, stacks


def decode_forward(model: Decoder, stacks: dict, tokens, positions, s: int, dtype, absorbed: bool = True,
                   layer_states: dict | None = None):
    """One token per slot: tokens [B] at positions [B] -> (hidden [B,D], stacks); see `forward_cached`."""
    x, stacks = forward_cached(model, stacks, tokens[:, None], positions[:, None], None, s, dtype, absorbed,
                               layer_states)
    return x[:, 0], stacks


def _last_logits(model: Decoder, x) -> jax.Array:
    """hidden [B,D] -> logits [B,V] f32."""
    return model.head(model.norm(x[:, None]))[:, 0]


@contextlib.contextmanager
def _decode_placement(placement: Placement):
    """`placement.active()`, plus the small-batch expert kernel on a single CPU device."""
    with placement.active():
        if placement.mesh is None and jax.default_backend() == "cpu":
            with use_expert_fn(small_batch_experts):
                yield
        else:
            yield


# ----------------------------------------------------------------------------- sampling


def sample_tokens(logits, temperature, top_k, top_p, uniforms) -> tuple[jax.Array, jax.Array]:
    """logits [B,V] f32, per-row params and one uniform draw a row in [0, 1) (`slot_uniforms`)
    -> (tokens [B] int32, log-probs [B] f32)."""
    # A batch of greedy rows needs no random draw (nor the sort of top-k / top-p).
    return jax.lax.cond(jnp.all(temperature <= 0), _greedy_tokens, _sampled_tokens,
                        logits, temperature, top_k, top_p, uniforms)


def argmax_first(x: jax.Array) -> jax.Array:
    """`jnp.argmax(x, -1)` as int32 (the first maximum; NaN rows give the last index) from two
    plain reductions: XLA:CPU's fused value-and-index reduce is 2-4x slower ([16, 32768]: 1.04
    against 0.55 ms)."""
    v = x.shape[-1]
    ids = jnp.arange(v, dtype=jnp.int32)
    return jnp.minimum(jnp.min(jnp.where(x == jnp.max(x, -1, keepdims=True), ids, v), -1), v - 1)


def _greedy_tokens(logits, temperature, top_k, top_p, uniforms):
    tokens = argmax_first(logits)
    return tokens, jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=1)[:, 0]


def _sampled_tokens(logits, temperature, top_k, top_p, uniforms):
    """Each row draws from softmax(logits / T) restricted to its top-k / top-p set. The draw is
    over token ids whatever the truncation, so a row's token never depends on whether its batch
    needed the vocabulary sort, which runs only when some row asks for top-k or top-p (a GRPO
    rollout at T 1 does not: the sort was half of its decode time)."""
    greedy = temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]
    truncates = ((top_k > 0) | (top_p < 1.0)) & ~greedy
    keep = jax.lax.cond(jnp.any(truncates), _truncation_mask, lambda s, k, p: jnp.ones(s.shape, bool),
                        scaled, top_k, top_p)
    masked = jnp.where(keep | ~truncates[:, None], scaled, -jnp.inf)
    log_probs = jax.nn.log_softmax(masked, axis=-1)
    choice = _inverse_cdf_draw(uniforms, jnp.exp(log_probs))
    tokens = jnp.where(greedy, argmax_first(logits), choice).astype(jnp.int32)
    sampled_lp = jnp.take_along_axis(log_probs, tokens[:, None], axis=1)[:, 0]
    model_lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=1)[:, 0]
    return tokens, jnp.where(greedy, model_lp, sampled_lp)


def _inverse_cdf_draw(uniforms, probs):
    """[B] uniforms in [0, 1), probs [B,V] -> [B] token ids: the first id whose cumulative
    probability exceeds the row's draw (scaled to the row's total). Exact categorical sampling
    from one random number a row, where `jax.random.categorical` draws V Gumbels (a fifth of
    tiny-moe's decode step on CPU).
    Zero-probability ids are never chosen: their cumulative sum equals their predecessor's, and a
    draw that rounds up to the total is clamped to the last id with probability."""
    cdf = jnp.cumsum(probs, axis=-1)
    u = uniforms * cdf[:, -1]
    last = jnp.max(jnp.where(probs > 0, jnp.arange(probs.shape[1], dtype=jnp.int32), 0), axis=-1)
    return jnp.minimum(jnp.sum(cdf <= u[:, None], axis=-1), last)


def _truncation_mask(scaled, top_k, top_p):
    """[B,V] scaled logits -> [B,V] bool in token-id order: the row's top_k tokens (0: all), then
    the smallest of those, by logit, whose probability reaches top_p (the top token always
    stays). Tokens tied with the last one kept are kept too."""
    v = scaled.shape[1]
    ranked = -jnp.sort(-scaled, axis=-1)  # descending
    in_k = jnp.arange(v)[None] < jnp.where(top_k > 0, top_k, v)[:, None]
    probs = jax.nn.softmax(jnp.where(in_k, ranked, -jnp.inf), axis=-1)
    in_p = (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]
    last = jnp.maximum(jnp.sum(in_k & in_p, axis=-1), 1) - 1
    return scaled >= jnp.take_along_axis(ranked, last[:, None], axis=1)


# ----------------------------------------------------------------------------- compiled steps


def sampling_jit(fn=None, **jit_kwargs):
    """`jax.jit` for the sampling engine's compiled steps: on CPU they compile without XLA's
    YNNPACK fusions, whose matmuls run slower here than XLA's own dot kernels at these shapes
    (tiny-moe 16 slots: ~3.5 -> ~3.0 ms a decode step, in-process A/B, same tokens; prefill of
    8 x 128 tokens: tiny-moe ~10k -> ~16.5k tokens/s, small-moe ~217 -> ~236). Other backends:
    plain jit. The backend is read at call time, so importing this module initialises none."""
    if fn is None:
        return functools.partial(sampling_jit, **jit_kwargs)
    plain = jax.jit(fn, **jit_kwargs)
    cpu = jax.jit(fn, compiler_options={"xla_cpu_experimental_ynn_fusion_type": ""}, **jit_kwargs)
    pick = lambda: cpu if jax.default_backend() == "cpu" else plain  # noqa: E731

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return pick()(*args, **kwargs)

    call.lower = lambda *args, **kwargs: pick().lower(*args, **kwargs)
    return call


@sampling_jit(static_argnums=(0, 1, 2), donate_argnames=("cache", "logits_buf"))
def _prefill_chunk(graphdef, placement: Placement, prefix: int, params, extra, layers, cache: Cache, logits_buf,
                   tokens, start, rows, lengths):
    """One chunk of right-padded prompts: tokens [P,T] at positions start[p] + t of slots rows
    [P] (>= slots: padding rows, dropped), attending over cache entries [:prefix] (static, >
    start + T - 1). Last-token logits of rows whose prompt ends in this chunk go to logits_buf
    [slots, V]; lengths [P] become the slots' lengths."""
    with placement.active():
        model = nnx.merge(graphdef, params, extra)
        t = tokens.shape[1]
        positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
        dtype = _cache_dtype(cache)
        bits = jax.tree.map(_bits, cache.stacks)
        x, bits = forward_cached(model, bits, tokens, positions, rows, prefix, dtype, absorbed=False,
                                 layer_states=layers)
        stacks = jax.tree.map(lambda a: _unbits(a, dtype), bits)
        idx = lengths - 1 - start
        last = jnp.take_along_axis(x, jnp.clip(idx, 0, t - 1)[:, None, None], axis=1)
        logits = model.head(model.norm(last))[:, 0]
        in_chunk = (idx >= 0) & (idx < t)
        old = logits_buf[jnp.minimum(rows, logits_buf.shape[0] - 1)]
        logits_buf = logits_buf.at[rows].set(jnp.where(in_chunk[:, None], logits, old), mode="drop")
        cache = Cache(stacks, cache.lengths.at[rows].set(lengths, mode="drop"))
        cache = placement.constrain_cache(cache, model.cfg)
    return cache, logits_buf


def _decode_logits(graphdef, placement, absorbed, params, extra, layers, cache: Cache, tokens, active):
    with _decode_placement(placement):
        model = nnx.merge(graphdef, params, extra)
        dtype = _cache_dtype(cache)
        bits = jax.tree.map(_bits, cache.stacks)
        x, bits = decode_forward(model, bits, tokens, cache.lengths, cache.max_len, dtype, absorbed, layers)
        stacks = jax.tree.map(lambda a: _unbits(a, dtype), bits)
        cache = placement.constrain_cache(Cache(stacks, cache.lengths + active.astype(jnp.int32)), model.cfg)
    return cache, _last_logits(model, x), x


def _cache_dtype(cache: Cache):
    return next(iter(next(iter(cache.stacks.values())).values())).dtype


_decode_logits_jit = sampling_jit(_decode_logits, static_argnums=(0, 1, 2), donate_argnames=("cache",))


@sampling_jit(static_argnums=(0, 1, 2, 3), donate_argnames=("cache",))
def _decode_chunk(graphdef, placement: Placement, steps: int, bucket: int, params, extra, layers, cache: Cache,
                  tokens, active, temperature, top_k, top_p, seeds, sample_index, token_index, max_tokens, stop_ids):
    """The hot loop: up to `steps` decode + sample steps on device, attending over cache entries
    [:bucket]. tokens [B] (each slot's last token), active [B], the sampling params [B],
    token_index [B] (tokens the request has), max_tokens [B], stop_ids [B,Z] (-1: padding).
    A row stops after a stop token, its max_tokens-th token or when its cache row is full
    (the loop ends early once all have) -> (cache, tokens [B,steps], logprobs [B,steps],
    count [B]: the valid leading entries of each row)."""
    b = tokens.shape[0]
    dtype = _cache_dtype(cache)
    with _decode_placement(placement):
        model = nnx.merge(graphdef, params, extra)

        def body(carry):
            j, cache, last, tidx, done, out_t, out_lp = carry
            run = ~done
            x, stacks = decode_forward(model, cache.stacks, last, cache.lengths, bucket, dtype, layer_states=layers)
            lengths = cache.lengths + run.astype(jnp.int32)
            cache = placement.constrain_cache(Cache(stacks, lengths), model.cfg)
            u = slot_uniforms(seeds, sample_index, tidx)
            new, lp = sample_tokens(_last_logits(model, x), temperature, top_k, top_p, u)
            tidx = tidx + run.astype(jnp.int32)
            stop = jnp.any(new[:, None] == stop_ids, axis=1) | (tidx >= max_tokens) | (lengths >= cache.max_len)
            out_t = out_t.at[:, j].set(jnp.where(run, new, 0))
            out_lp = out_lp.at[:, j].set(jnp.where(run, lp, 0.0))
            return j + 1, cache, jnp.where(run, new, last), tidx, done | (run & stop), out_t, out_lp

        def cond(carry):
            return (carry[0] < steps) & ~jnp.all(carry[4])

        cache = Cache(jax.tree.map(_bits, cache.stacks), cache.lengths)  # written in place through the loop
        init = (jnp.int32(0), cache, tokens, token_index, ~active, jnp.zeros((b, steps), jnp.int32),
                jnp.zeros((b, steps), jnp.float32))
        _, cache, _, tidx, _, out_t, out_lp = jax.lax.while_loop(cond, body, init)
        cache = Cache(jax.tree.map(lambda a: _unbits(a, dtype), cache.stacks), cache.lengths)
    return cache, out_t, out_lp, tidx - token_index


@jax.jit
def _sample_rows(logits_buf, temperature, top_k, top_p, seeds, sample_index, token_index):
    return sample_tokens(logits_buf, temperature, top_k, top_p, slot_uniforms(seeds, sample_index, token_index))


@functools.partial(jax.jit, donate_argnames=("cache", "logits_buf"))
def _copy_rows(cache: Cache, logits_buf, src, dst):
    """Slot dst[i] <- slot src[i] (cache rows, length, pending logits); dst >= slots: no-op."""
    cp = lambda a: a.at[:, dst].set(a[:, jnp.minimum(src, a.shape[1] - 1)], mode="drop")  # noqa: E731
    stacks = jax.tree.map(cp, cache.stacks)
    lengths = cache.lengths.at[dst].set(cache.lengths[jnp.minimum(src, cache.slots - 1)], mode="drop")
    logits_buf = logits_buf.at[dst].set(logits_buf[jnp.minimum(src, logits_buf.shape[0] - 1)], mode="drop")
    return Cache(stacks, lengths), logits_buf


# ----------------------------------------------------------------------------- free functions


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def prefill(weights, cache: Cache, prompts: Sequence[Sequence[int]], rows: Sequence[int], logits_buf=None, *,
            chunk: int = 256, min_bucket: int = 16, min_rows: int = 1, placement: Placement = Placement()):
    """Writes whole prompts into the cache slots `rows` -> (cache, logits_buf [slots, V]: the
    last-token logits in those rows). One compiled call per chunk, compiled once per
    (rows bucket, length bucket, attended prefix: a power of two); `cache` and `logits_buf`
    are donated."""
    w = Weights.of(weights)
    slots = cache.slots
    if logits_buf is None:
        logits_buf = jnp.zeros((slots, w.cfg.vocab_size), jnp.float32)
    if not prompts:
        return cache, logits_buf
    p = min(_pow2(len(prompts), min_rows), _pow2(slots, min_rows))
    longest = max(len(x) for x in prompts)
    t = min(_pow2(longest, min_bucket), chunk)
    total = math.ceil(longest / t) * t
    tokens = np.zeros((p, total), np.int32)
    for i, x in enumerate(prompts):
        tokens[i, : len(x)] = x
    row_ids = np.full((p,), slots, np.int32)
    row_ids[: len(rows)] = rows
    lengths = np.zeros((p,), np.int32)
    lengths[: len(prompts)] = [len(x) for x in prompts]
    for s in range(0, total, t):
        prefix = min(_pow2(s + t), cache.max_len)
        cache, logits_buf = _prefill_chunk(w.graphdef, placement, prefix, w.params, w.extra, w.layers, cache,
                                           logits_buf,
                                           tokens[:, s: s + t], np.full((p,), s, np.int32), row_ids, lengths)
    return cache, logits_buf


def decode_step(weights, cache: Cache, tokens, active=None, *, placement: Placement = Placement()):
    """Absorbed MLA (or GQA) decode of one token per slot -> (cache, logits [B,V] f32, hidden [B,D])."""
    w = Weights.of(weights)
    active = jnp.ones((cache.slots,), bool) if active is None else active
    return _decode_logits_jit(w.graphdef, placement, True, w.params, w.extra, w.layers, cache,
                              jnp.asarray(tokens, jnp.int32), active)


def naive_decode_step(weights, cache: Cache, tokens, active=None, *, placement: Placement = Placement()):
    """`decode_step` with per-head K/V rebuilt from the cached latent (tests only)."""
    w = Weights.of(weights)
    active = jnp.ones((cache.slots,), bool) if active is None else active
    return _decode_logits_jit(w.graphdef, placement, False, w.params, w.extra, None, cache,
                              jnp.asarray(tokens, jnp.int32), active)


# ----------------------------------------------------------------------------- engine


@dataclasses.dataclass
class _Request:
    request_id: Hashable
    prompt: list[int]
    sampling: SamplingParams
    on_token: Callable[[Event], None] | None
    sample_index: int
    seed: int
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    text: str | None = None
    slot: int | None = None


class Engine:
    """Continuous batching over `slots` fixed cache rows. `step()` admits waiting requests into
    free slots (prefill, first token), then decodes up to `decode_chunk` tokens for every active
    slot in one compiled call (smaller: events stream sooner, new requests wait less); a finished
    or aborted request frees its slot for the next step. Not thread-safe: one thread drives it."""

    def __init__(self, model_or_state, *, slots: int = 8, max_len: int = 1024, tokenizer=None,
                 cache_dtype=jnp.bfloat16, mesh: Mesh | None = None, rules: dict[str, MeshAxes] | None = None,
                 capacity_factor: float | None = None, prefill_chunk: int = 256, min_bucket: int = 16,
                 decode_chunk: int = 8):
        w = Weights.of(model_or_state)
        self.cfg = w.cfg
        self.tokenizer = tokenizer
        self.slots, self.max_len = slots, max_len
        self.prefill_chunk, self.min_bucket = prefill_chunk, min_bucket
        self.decode_chunk = decode_chunk  # tokens per compiled decode call (streaming: events come in chunks)
        self.min_rows = 1
        self.cache_shardings = None
        if mesh is not None:
            from r1jax.train.state import shardings

            rules = rules or rules_lib.rules_for(False)
            batch_axes = rules_lib.to_pspec(("batch",), rules, mesh.axis_names)[0]
            batch_axes = () if batch_axes is None else (batch_axes,) if isinstance(batch_axes, str) else batch_axes
            self.min_rows = math.prod(mesh.shape[a] for a in batch_axes)
            if slots % self.min_rows:
                raise ValueError(f"slots={slots} do not split over the batch axes ({self.min_rows} shards)")
            w = Weights(w.graphdef, jax.device_put(w.params, shardings(w.params, mesh, rules)),
                        jax.device_put(w.extra, shardings(w.extra, mesh, rules)))
            self.placement = Placement(mesh, tuple(sorted(rules.items())), capacity_factor)
        else:
            self.placement = Placement()
        self.weights = w  # the property below adds per-layer copies on one CPU device
        self.cache = init_cache(self.cfg, slots, max_len, dtype=cache_dtype, mesh=mesh, rules=rules)
        self.logits_buf = jnp.zeros((slots, self.cfg.vocab_size), jnp.float32)
        self.waiting: collections.deque[_Request] = collections.deque()
        self.running: dict[int, _Request] = {}  # slot -> request
        self.by_id: dict[Hashable, _Request] = {}
        self.last_token = np.zeros((slots,), np.int32)
        self.lengths = np.zeros((slots,), np.int32)
        self.decode_steps = 0

    @property
    def weights(self) -> Weights:
        return self._weights

    @weights.setter
    def weights(self, w) -> None:
        w = Weights.of(w)
        if self.placement.mesh is None and jax.default_backend() == "cpu" and w.layers is None:
            w = w.unstacked()
        self._weights = w

    # ------------------------------------------------------------------ requests

    def add_request(self, request_id: Hashable, prompt_ids: Sequence[int], sampling: SamplingParams,
                    on_token: Callable[[Event], None] | None = None, *, sample_index: int = 0) -> None:
        if request_id in self.by_id:
            raise ValueError(f"request {request_id!r} is already in the engine")
        if not 0 < len(prompt_ids) < self.max_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens: need 1..{self.max_len - 1} (max_len)")
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(31)
        req = _Request(request_id, list(map(int, prompt_ids)), sampling, on_token, sample_index, seed)
        self.by_id[request_id] = req
        self.waiting.append(req)

    def abort(self, request_id: Hashable) -> None:
        """Drops a request (waiting or running); its slot is free for the next step. No event."""
        req = self.by_id.pop(request_id, None)
        if req is None:
            return
        if req.slot is not None:
            self.running.pop(req.slot, None)
        else:
            self.waiting.remove(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def result(self, request_id: Hashable) -> Completion:
        req = self.by_id[request_id]
        return Completion(req.token_ids, req.logprobs, req.finish_reason, req.text)

    def pop_result(self, request_id: Hashable) -> Completion:
        out = self.result(request_id)
        del self.by_id[request_id]
        return out

    # ------------------------------------------------------------------ stepping

    def _slot_arrays(self, slots: Sequence[int]):
        n = self.slots
        temp, top_k, top_p = np.zeros(n, np.float32), np.zeros(n, np.int32), np.ones(n, np.float32)
        seeds, sidx, tidx = np.zeros(n, np.uint32), np.zeros(n, np.int32), np.zeros(n, np.int32)
        for s in slots:
            r = self.running[s]
            temp[s], top_k[s], top_p[s] = r.sampling.temperature, r.sampling.top_k, r.sampling.top_p
            seeds[s], sidx[s], tidx[s] = r.seed, r.sample_index, len(r.token_ids)
        return temp, top_k, top_p, seeds, sidx, tidx

    def _admit(self) -> list[int]:
        free = [s for s in range(self.slots) if s not in self.running]
        admitted = []
        while self.waiting and free:
            req = self.waiting.popleft()
            req.slot = free.pop(0)
            self.running[req.slot] = req
            admitted.append(req)
        if not admitted:
            return []
        # Identical prompts (the n samples of one prompt) are prefilled once and copied.
        first: dict[tuple[int, ...], int] = {}
        copies = []
        for req in admitted:
            key = tuple(req.prompt)
            if key in first:
                copies.append((first[key], req.slot))
            else:
                first[key] = req.slot
        unique = [self.running[s] for s in first.values()]
        by_bucket: dict[int, list[_Request]] = collections.defaultdict(list)
        for req in unique:
            by_bucket[min(_pow2(len(req.prompt), self.min_bucket), self.prefill_chunk)].append(req)
        for group in by_bucket.values():
            for i in range(0, len(group), self.slots):
                part = group[i: i + self.slots]
                self.cache, self.logits_buf = prefill(
                    self.weights, self.cache, [r.prompt for r in part], [r.slot for r in part], self.logits_buf,
                    chunk=self.prefill_chunk, min_bucket=self.min_bucket, min_rows=self.min_rows,
                    placement=self.placement)
        if copies:
            src = np.full((self.slots,), self.slots, np.int32)
            dst = np.full((self.slots,), self.slots, np.int32)
            src[: len(copies)], dst[: len(copies)] = zip(*copies)
            self.cache, self.logits_buf = _copy_rows(self.cache, self.logits_buf, src, dst)
        for req in admitted:
            self.lengths[req.slot] = len(req.prompt)
        return [r.slot for r in admitted]

    def step(self) -> list[Event]:
        """Admits what fits, then up to decode_chunk tokens for every active slot. Returns the
        events (also passed to each request's `on_token`)."""
        events: list[Event] = []
        admitted = self._admit()
        if admitted:
            tokens, logprobs = _sample_rows(self.logits_buf, *self._slot_arrays(admitted))
            tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
            for s in admitted:
                self._emit(s, int(tokens[s]), float(logprobs[s]), events)
        if self.running:
            self._decode(events)
        return events

    def _stop_arrays(self, slots: Sequence[int]):
        """(max_tokens [B], stop_ids [B,Z] padded with -1; Z a power of two: few compiles)."""
        z = _pow2(max(len(self.running[s].sampling.stop_token_ids) for s in slots))
        max_tokens, stop_ids = np.zeros(self.slots, np.int32), np.full((self.slots, z), -1, np.int32)
        for s in slots:
            sp = self.running[s].sampling
            max_tokens[s] = sp.max_tokens
            stop_ids[s, : len(sp.stop_token_ids)] = sp.stop_token_ids
        return max_tokens, stop_ids

    def _decode(self, events: list[Event]) -> None:
        """One compiled call of up to decode_chunk tokens for every running slot, then their events.
        A request the host finishes early (a stop string) drops the rest of its chunk."""
        slots = sorted(self.running)
        active = np.zeros((self.slots,), bool)
        active[slots] = True
        # Attend over a power-of-two prefix of the cache rows that holds every position of the chunk.
        bucket = min(self.max_len, _pow2(int(self.lengths[slots].max()) + self.decode_chunk, 64))
        w = self.weights
        self.cache, tokens, logprobs, counts = _decode_chunk(
            w.graphdef, self.placement, self.decode_chunk, bucket, w.params, w.extra, w.layers, self.cache,
            self.last_token,
            active, *self._slot_arrays(slots), *self._stop_arrays(slots))
        tokens, logprobs, counts = np.asarray(tokens), np.asarray(logprobs), np.asarray(counts)
        self.decode_steps += int(counts.max())
        for s in slots:
            req = self.running[s]
            for j in range(counts[s]):
                if self.running.get(s) is not req:  # finished (or aborted by a callback) earlier in the chunk
                    break
                self.lengths[s] += 1
                self._emit(s, int(tokens[s, j]), float(logprobs[s, j]), events)

    def _emit(self, slot: int, token: int, logprob: float, events: list[Event]) -> None:
        req = self.running[slot]
        req.token_ids.append(token)
        req.logprobs.append(logprob)
        self.last_token[slot] = token
        sp = req.sampling
        reason = None
        stop_at = None
        if token in sp.stop_token_ids:
            reason = "stop"
        elif sp.stop and self.tokenizer is not None:
            text = self.tokenizer.decode(req.token_ids)
            hits = [text.find(s) for s in sp.stop if s in text]
            if hits:
                reason, stop_at = "stop", min(hits)
        if reason is None and (len(req.token_ids) >= sp.max_tokens or self.lengths[slot] >= self.max_len):
            reason = "length"  # max_tokens, or the cache row is full (this token has no place in it)
        if reason is not None:
            req.finish_reason = reason
            if self.tokenizer is not None:
                ids = req.token_ids[:-1] if token in sp.stop_token_ids else req.token_ids
                text = self.tokenizer.decode(ids)
                req.text = text[:stop_at] if stop_at is not None else text
            del self.running[slot]
            req.slot = None
        event = Event(req.request_id, token, logprob, reason)
        events.append(event)
        if req.on_token is not None:
            req.on_token(event)


def generate(model_or_state, prompts: list[list[int]], sampling: SamplingParams, n: int = 1, *, tokenizer=None,
             engine: Engine | None = None, slots: int | None = None, max_len: int | None = None,
             **engine_kwargs) -> list[list[Completion]]:
    """n completions of every prompt. Request (i, j) uses the seed `sampling.seed` and sample
    index j, so its tokens do not depend on the other prompts. Builds an `Engine` unless one is
    given (slots and max_len round up to powers of two, so repeated calls reuse compilations)."""
    if engine is None:
        longest = max(len(p) for p in prompts)
        max_len = max_len or _pow2(longest + sampling.max_tokens, 64)
        slots = slots or min(_pow2(len(prompts) * n, 8), 64)
        engine = Engine(model_or_state, slots=slots, max_len=max_len, tokenizer=tokenizer, **engine_kwargs)
    seed = sampling.seed if sampling.seed is not None else secrets.randbits(31)
    sampling = dataclasses.replace(sampling, seed=seed)
    for i, prompt in enumerate(prompts):
        for j in range(n):
            engine.add_request(("generate", i, j), prompt, sampling, sample_index=j)
    while engine.has_work():
        engine.step()
    return [[engine.pop_result(("generate", i, j)) for j in range(n)] for i in range(len(prompts))]
