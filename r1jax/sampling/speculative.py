"""Greedy speculative decoding with the depth-1 MTP module as the drafter (spec §4).

Per slot the state is: the cache holds positions < ℓ, `last` (token ℓ, sampled, not yet in
the cache) and `draft` (the MTP's guess for token ℓ+1). One compiled step:

  1. verify: the main model runs [last, draft] at positions ℓ, ℓ+1 (absorbed MLA, T = 2):
     y0 = argmax at ℓ (the true token ℓ+1), y1 = argmax at ℓ+1 (the token after the draft).
     accept = (y0 == draft): emit y0 and y1, else only y0. Greedy output is therefore exactly
     plain greedy decoding's (up to float ties).
  2. draft: the MTP block runs at positions ℓ, ℓ+1 on (main hidden h_i before the final norm,
     embedding of the token i+1 = [y0, y1]); its logits at the position of the new `last`
     (ℓ+1 if accepted, else ℓ) give the next draft. The MTP has its own cache stack (`mtp`),
     aligned with the main one: both hold exactly the positions < the slot's length.
Entries written for a rejected draft lie at or past the new length: masked, then overwritten.
As in the engine's decode loop, up to `chunk` steps run on device per compiled call (a
`while_loop` that ends once every row has its tokens), attending over a power-of-two prefix of
the cache, from per-layer weight arrays on one CPU device (`Weights.unstacked`).

    out = speculative_generate(model, prompts, max_tokens=100)   # out.tokens, out.acceptance_rate

Left out: sampling (temperature > 0 needs rejection sampling of the draft), continuous
batching (the batch starts and ends together), chunked prefill, MTP depth > 1.
"""

from __future__ import annotations

import dataclasses
import time
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from r1jax.model.decoder import Decoder
from r1jax.parallel.backend import on_cpu
from r1jax.sampling.cache import Cache, init_cache
from r1jax.sampling.forward import cache_dtype, forward_cached, from_bits, layer_cache, to_bits
from r1jax.sampling.layout import Placement, Weights
from r1jax.sampling.steps import pow2, sampling_jit
from r1jax.sampling.tokens import argmax_first


def mtp_cached(model: Decoder, stacks: dict, h_prev, next_tokens, positions, s: int, dtype, absorbed: bool,
               layout: dict | None = None):
    """MTP depth 1 over the cache (bits arrays, see `forward_cached`; `MTPLayer.cached`):
    h_prev [B,T,D] (main hidden at positions), next_tokens [B,T] (the token after each
    position) -> (draft logits [B,T,V], stacks). layout: the MTP block's `decode_layout`, for
    the single-device decode."""
    stacks = dict(stacks)
    cache_io = layer_cache(stacks["mtp"], 0, None, positions, s, dtype)
    _, normed, stacks["mtp"] = model.mtp[0].cached(h_prev, model.embed_tokens(next_tokens), positions, cache_io,
                                                   absorbed=absorbed, layout=layout)
    return model.head(normed), stacks


@sampling_jit(static_argnums=(0, 1), donate_argnames=("cache",))
def _prefill(graphdef, placement: Placement, params, extra, layers, cache: Cache, tokens, lengths):
    """Right-padded prompts [B,T] -> (cache, first token [B], first draft [B])."""
    with placement.active():
        model = placement.model(graphdef, params, extra)
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        dtype, s = cache_dtype(cache), min(pow2(t), cache.max_len)
        stacks = jax.tree.map(to_bits, cache.stacks)
        x, stacks = forward_cached(model, stacks, tokens, positions, None, s, dtype, absorbed=False,
                                   layer_states=layers)
        last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)
        first = argmax_first(model.head(model.norm(last))[:, 0])
        nxt = jnp.roll(tokens, -1, axis=1)
        nxt = jnp.where(jnp.arange(t)[None] == (lengths - 1)[:, None], first[:, None], nxt)
        mtp_logits, stacks = mtp_cached(model, stacks, x, nxt, positions, s, dtype, absorbed=False)
        draft_logits = jnp.take_along_axis(mtp_logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
        draft = argmax_first(draft_logits)
    return Cache(jax.tree.map(lambda a: from_bits(a, dtype), stacks), lengths), first, draft


class _VerifyLoop(NamedTuple):
    """The state of `_verify_chunk`'s while_loop."""

    step: jax.Array  # [] int32
    stacks: dict  # cache arrays as their bits (`to_bits`)
    lengths: jax.Array  # [B]
    last: jax.Array  # [B] token at the row's length, not yet in the cache
    draft: jax.Array  # [B] the MTP's guess for the token after it
    budget: jax.Array  # [B] tokens the row still needs
    y: jax.Array  # [B, steps, 2] out
    accepted: jax.Array  # [B, steps] out
    ran: jax.Array  # [B, steps] out


@sampling_jit(static_argnums=(0, 1, 2, 3), donate_argnames=("cache",))
def _verify_chunk(graphdef, placement: Placement, steps: int, bucket: int, params, extra, layers, cache: Cache,
                  last, draft, budget, forced=None):
    """Up to `steps` verify + draft steps on device, attending over cache entries [:bucket].
    budget [B]: tokens a row still needs (a row runs while it is > 0; the loop ends once no row
    does); forced (tests): (drafts [B,W] for each completion token index, tokens [B] each row
    has) replaces the MTP's drafts -> (cache, y [B,steps,2], accepted [B,steps], ran [B,steps],
    last, draft)."""
    b = last.shape[0]
    dtype = cache_dtype(cache)
    with placement.active():
        model = placement.model(graphdef, params, extra, decode=True)
        mtp_layout = model.mtp[0].block.decode_layout()  # once a call, outside the loop
        budget0 = budget

        def body(carry: _VerifyLoop) -> _VerifyLoop:
            j, stacks, lengths, last, draft, budget, out_y, out_acc, out_ran = carry
            run = budget > 0
            positions = lengths[:, None] + jnp.arange(2, dtype=jnp.int32)[None]
            x, stacks = forward_cached(model, stacks, jnp.stack([last, draft], 1), positions, None, bucket, dtype,
                                       absorbed=True, layer_states=layers)
            y = argmax_first(model.head(model.norm(x)))  # [B, 2]
            accepted = (y[:, 0] == draft) & run
            mtp_logits, stacks = mtp_cached(model, stacks, x, y, positions, bucket, dtype, True, mtp_layout)
            drafts = argmax_first(mtp_logits)
            emitted = jnp.where(run, 1 + accepted.astype(jnp.int32), 0)
            out_y = out_y.at[:, j].set(y)
            out_acc = out_acc.at[:, j].set(accepted)
            out_ran = out_ran.at[:, j].set(run)
            last = jnp.where(run, jnp.where(accepted, y[:, 1], y[:, 0]), last)
            draft = jnp.where(run, jnp.where(accepted, drafts[:, 1], drafts[:, 0]), draft)
            if forced is not None:
                table, had = forced
                index = jnp.minimum(had + budget0 - budget + emitted, table.shape[1] - 1)
                draft = jnp.take_along_axis(table, index[:, None], axis=1)[:, 0]
            return _VerifyLoop(j + 1, stacks, lengths + emitted, last, draft, budget - emitted, out_y, out_acc,
                               out_ran)

        def cond(carry: _VerifyLoop):
            return (carry.step < steps) & jnp.any(carry.budget > 0)

        init = _VerifyLoop(jnp.int32(0), jax.tree.map(to_bits, cache.stacks), cache.lengths, last, draft, budget,
                           jnp.zeros((b, steps, 2), jnp.int32), jnp.zeros((b, steps), bool),
                           jnp.zeros((b, steps), bool))
        _, stacks, lengths, last, draft, _, out_y, out_acc, out_ran = jax.lax.while_loop(cond, body, init)
        cache = Cache(jax.tree.map(lambda a: from_bits(a, dtype), stacks), lengths)
    return cache, out_y, out_acc, out_ran, last, draft


@dataclasses.dataclass
class SpeculativeResult:
    tokens: list[list[int]]  # max_tokens greedy tokens per prompt
    steps: int  # verify steps run
    drafts: int  # drafts proposed (one per active row per step)
    accepted: int
    seconds: float  # wall time of the decode loop (prefill excluded), compiled

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafts, 1)

    @property
    def tokens_per_second(self) -> float:
        return sum(len(t) - 1 for t in self.tokens) / max(self.seconds, 1e-9)


def speculative_generate(model_or_state, prompts: Sequence[Sequence[int]], max_tokens: int, *,
                         max_len: int | None = None, cache_dtype=jnp.float32, min_bucket: int = 16,
                         chunk: int = 8, forced_drafts: np.ndarray | None = None) -> SpeculativeResult:
    """Greedy completions of `prompts` with MTP drafts, up to `chunk` verify steps per compiled
    call. `forced_drafts` [B, W], tests only: entry [row, i] replaces the MTP's draft for row's
    completion token i (i < W; to force acceptance or rejection)."""
    w = Weights.of(model_or_state)
    cfg = w.cfg
    if cfg.num_nextn_predict_layers < 1:
        raise ValueError("speculative decoding needs an MTP module (num_nextn_predict_layers >= 1)")
    if w.layers is None and on_cpu():
        w = w.unstacked()  # as `Engine` does on one CPU device
    b = len(prompts)
    longest = max(len(p) for p in prompts)
    t = pow2(longest, min_bucket)
    max_len = max_len or pow2(t + max_tokens + 2, 64)
    cache = init_cache(cfg, b, max_len, dtype=cache_dtype, mtp=True)
    tokens = np.zeros((b, t), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    placement = Placement()
    cache, last, draft = _prefill(w.graphdef, placement, w.params, w.extra, w.layers, cache, tokens, lengths)
    out = [[int(x)] for x in np.asarray(last)]
    steps = drafts = accepted_total = 0
    if forced_drafts is not None:
        forced_drafts = np.asarray(forced_drafts, np.int32)
        draft = forced_drafts[:, min(1, forced_drafts.shape[1] - 1)]
    jax.block_until_ready(cache)
    start = time.perf_counter()
    while min(len(o) for o in out) < max_tokens:
        budget = np.asarray([max_tokens - len(o) for o in out], np.int32)
        reach = max(len(p) + len(o) for p, o in zip(prompts, out) if len(o) < max_tokens) + 2 * chunk + 1
        bucket = min(pow2(reach, min_bucket), max_len)
        forced = None if forced_drafts is None else (forced_drafts, np.asarray([len(o) for o in out], np.int32))
        cache, y, accepted, ran, last, draft = _verify_chunk(w.graphdef, placement, chunk, bucket, w.params,
                                                             w.extra, w.layers, cache, last, draft, budget, forced)
        y, accepted, ran = np.asarray(y), np.asarray(accepted), np.asarray(ran)
        steps += int(ran.any(axis=0).sum())
        for r in range(b):
            for j in np.flatnonzero(ran[r]):
                drafts += 1
                accepted_total += int(accepted[r, j])
                out[r] += [int(y[r, j, 0]), int(y[r, j, 1])] if accepted[r, j] else [int(y[r, j, 0])]
    seconds = time.perf_counter() - start
    return SpeculativeResult([o[:max_tokens] for o in out], steps, drafts, accepted_total, seconds)
