"""The compiled sampling steps and the free functions over them: `prefill`, `decode_step`, and
the engine's hot decode loop (`decode_chunk`).

How it runs (gpt-fast style): the cache (`r1jax.sampling.cache`) is static, the compiled
functions write it in place (donated), and only three functions are compiled: the prefill chunk
(once per (rows, length) bucket: prompts are right-padded to a power of two, longer ones run in
chunks of `chunk`), the hot decode loop, and a row copy (once). The decode loop runs up to
`steps` decode + sample steps on device per call (a `while_loop`; a row stops on a stop token,
max_tokens or a full cache row, the loop as soon as every row has), attending over a
power-of-two prefix of the cache rows that holds the chunk (compiled once per such bucket, per
power of two of stop ids, and per sampling mode: the host picks the greedy, sampled or
truncated program from the rows' parameters, so no step branches on device). The host reads
back [B, steps] tokens and log-probs and a [B] count per call, nothing else. The weights go in
as `Weights.packed` (a static key hashed once and a flat tuple of arrays): a call's own host
cost stays ~10 µs.

MLA decode is absorbed (`MLA.cached`, spec §2); prefill uses the training form with K/V rebuilt
from the latent, which costs fewer FLOPs there; so does `naive_decode_step`, kept for tests. On
CPU every compiled step is built without XLA's YNNPACK fusions (`sampling_jit`).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from r1jax.parallel.backend import on_cpu
from r1jax.sampling.cache import Cache
from r1jax.sampling.forward import cache_dtype, decode_forward, forward_cached, from_bits, last_logits, to_bits
from r1jax.sampling.layout import Placement, Weights
from r1jax.sampling.rng import slot_uniforms
from r1jax.sampling.tokens import GREEDY, sample_tokens, sampling_mode


def pow2(n: int, lo: int = 1) -> int:
    """The smallest power of two >= n, at least lo: the buckets the compiled steps are built for."""
    return max(lo, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def sampling_jit(fn=None, **jit_kwargs):
    """`jax.jit` for the sampling engine's compiled steps: on CPU they compile without XLA's
    YNNPACK fusions, whose matmuls ran slower than XLA's own dot kernels at these shapes (see
    the README). Other backends: plain jit. The backend is read at call time (`on_cpu`), so
    importing this module initialises none."""
    if fn is None:
        return functools.partial(sampling_jit, **jit_kwargs)
    plain = jax.jit(fn, **jit_kwargs)
    cpu = jax.jit(fn, compiler_options={"xla_cpu_experimental_ynn_fusion_type": ""}, **jit_kwargs)
    pick = lambda: cpu if on_cpu() else plain  # noqa: E731

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return pick()(*args, **kwargs)

    call.lower = lambda *args, **kwargs: pick().lower(*args, **kwargs)
    return call


class SlotParams(NamedTuple):
    """Each slot's sampling parameters and draw counters, arrays [B]."""

    temperature: np.ndarray  # f32, 0: greedy
    top_k: np.ndarray  # int32, 0: off
    top_p: np.ndarray  # f32, 1: off
    seeds: np.ndarray  # uint32
    sample_index: np.ndarray  # int32
    token_index: np.ndarray  # int32: tokens the request has


class StopParams(NamedTuple):
    """When each slot stops: max_tokens [B] int32, stop_ids [B,Z] int32 (-1: padding)."""

    max_tokens: np.ndarray
    stop_ids: np.ndarray


class _DecodeLoop(NamedTuple):
    """The state of `decode_chunk`'s while_loop."""

    step: jax.Array  # [] int32
    cache: Cache  # values as their bits (`to_bits`)
    last: jax.Array  # [B] each row's last token
    token_index: jax.Array  # [B] tokens each request has
    done: jax.Array  # [B] bool
    tokens: jax.Array  # [B, steps] int32 out
    logprobs: jax.Array  # [B, steps] f32 out


@sampling_jit(static_argnums=(0, 1, 2), donate_argnames=("cache", "logits_buf"))
def _prefill_chunk(key, placement: Placement, prefix: int, leaves, cache: Cache, logits_buf, tokens, start, rows,
                   lengths):
    """One chunk of right-padded prompts: tokens [P,T] at positions start[p] + t of slots rows
    [P] (>= slots: padding rows, dropped), attending over cache entries [:prefix] (static, >
    start + T - 1). Last-token logits of rows whose prompt ends in this chunk go to logits_buf
    [slots, V]; lengths [P] become the slots' lengths. key, leaves: `Weights.packed`."""
    w = Weights.unpack(key, leaves)
    with placement.active():
        model = placement.model(w.graphdef, w.params, w.extra)
        t = tokens.shape[1]
        positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
        dtype = cache_dtype(cache)
        bits = jax.tree.map(to_bits, cache.stacks)
        x, bits = forward_cached(model, bits, tokens, positions, rows, prefix, dtype, absorbed=False,
                                 layer_states=w.layers)
        stacks = jax.tree.map(lambda a: from_bits(a, dtype), bits)
        idx = lengths - 1 - start
        last = jnp.take_along_axis(x, jnp.clip(idx, 0, t - 1)[:, None, None], axis=1)
        logits = model.head(model.norm(last))[:, 0]
        in_chunk = (idx >= 0) & (idx < t)
        old = logits_buf[jnp.minimum(rows, logits_buf.shape[0] - 1)]
        logits_buf = logits_buf.at[rows].set(jnp.where(in_chunk[:, None], logits, old), mode="drop")
        cache = Cache(stacks, cache.lengths.at[rows].set(lengths, mode="drop"))
        cache = placement.constrain_cache(cache, model.cfg)
    return cache, logits_buf


def _decode_logits(key, placement, absorbed, leaves, cache: Cache, tokens, active):
    w = Weights.unpack(key, leaves)
    with placement.active():
        model = placement.model(w.graphdef, w.params, w.extra, decode=True)
        dtype = cache_dtype(cache)
        bits = jax.tree.map(to_bits, cache.stacks)
        x, bits = decode_forward(model, bits, tokens, cache.lengths, cache.max_len, dtype, absorbed,
                                 w.layers if absorbed else None)
        stacks = jax.tree.map(lambda a: from_bits(a, dtype), bits)
        cache = placement.constrain_cache(Cache(stacks, cache.lengths + active.astype(jnp.int32)), model.cfg)
    return cache, last_logits(model, x), x


_decode_logits_jit = sampling_jit(_decode_logits, static_argnums=(0, 1, 2), donate_argnames=("cache",))


def decode_chunk(weights, placement: Placement, steps: int, bucket: int, cache: Cache, tokens, active,
                 slot: SlotParams, stop: StopParams, refill=False):
    """The hot loop: up to `steps` decode + sample steps on device, attending over cache entries
    [:bucket]. tokens [B] (each slot's last token), active [B], slot: the sampling params [B]
    (host arrays: they pick the program, `sampling_mode`), stop: when each row stops. A row stops
    after a stop token, its max_tokens-th token or when its cache row is full; the loop ends
    early once all have, or, with `refill` (requests are waiting for a slot), as soon as one has
    -> (cache, tokens [B,steps], logprobs [B,steps], count [B]: the valid leading entries of
    each row). `cache` is donated."""
    return _decode_chunk(*Weights.of(weights).packed, placement, steps, bucket, _mode(slot, active), cache, tokens,
                         active, slot, stop, np.bool_(refill))


def _mode(slot: SlotParams, active) -> str:
    on = np.asarray(active, bool)
    return sampling_mode(np.asarray(slot.temperature)[on], np.asarray(slot.top_k)[on], np.asarray(slot.top_p)[on])


@sampling_jit(static_argnums=(0, 2, 3, 4, 5), donate_argnames=("cache",))
def _decode_chunk(key, leaves, placement: Placement, steps: int, bucket: int, mode: str, cache: Cache, tokens, active,
                  slot: SlotParams, stop: StopParams, refill):
    b = tokens.shape[0]
    dtype = cache_dtype(cache)
    w = Weights.unpack(key, leaves)
    with placement.active():
        model = placement.model(w.graphdef, w.params, w.extra, decode=True)

        def body(s: _DecodeLoop) -> _DecodeLoop:
            run = ~s.done
            x, stacks = decode_forward(model, s.cache.stacks, s.last, s.cache.lengths, bucket, dtype,
                                       layer_states=w.layers)
            lengths = s.cache.lengths + run.astype(jnp.int32)
            cache = placement.constrain_cache(Cache(stacks, lengths), model.cfg)
            u = None if mode == GREEDY else slot_uniforms(slot.seeds, slot.sample_index, s.token_index)
            new, lp = sample_tokens(last_logits(model, x), slot.temperature, slot.top_k, slot.top_p, u, mode)
            tidx = s.token_index + run.astype(jnp.int32)
            hit = (jnp.any(new[:, None] == stop.stop_ids, axis=1) | (tidx >= stop.max_tokens)
                   | (lengths >= cache.max_len))
            return _DecodeLoop(s.step + 1, cache, jnp.where(run, new, s.last), tidx, s.done | (run & hit),
                               s.tokens.at[:, s.step].set(jnp.where(run, new, 0)),
                               s.logprobs.at[:, s.step].set(jnp.where(run, lp, 0.0)))

        def cond(s: _DecodeLoop):
            return (s.step < steps) & ~jnp.all(s.done) & ~(refill & jnp.any(s.done & active))

        cache = Cache(jax.tree.map(to_bits, cache.stacks), cache.lengths)  # written in place through the loop
        init = _DecodeLoop(jnp.int32(0), cache, tokens, slot.token_index, ~active, jnp.zeros((b, steps), jnp.int32),
                           jnp.zeros((b, steps), jnp.float32))
        out = jax.lax.while_loop(cond, body, init)
        cache = Cache(jax.tree.map(lambda a: from_bits(a, dtype), out.cache.stacks), out.cache.lengths)
    return cache, out.tokens, out.logprobs, out.token_index - slot.token_index


def decode_chunk_lower(weights, placement: Placement, steps: int, bucket: int, cache: Cache, tokens, active,
                       slot: SlotParams, stop: StopParams, refill=False):
    """`decode_chunk`'s program, lowered (for inspecting its HLO)."""
    return _decode_chunk.lower(*Weights.of(weights).packed, placement, steps, bucket, _mode(slot, active), cache,
                               tokens, active, slot, stop, np.bool_(refill))


decode_chunk.lower = decode_chunk_lower


def sample_rows(logits_buf, slot: SlotParams, rows: Sequence[int]):
    """A token for every row of logits_buf [slots, V] -> (tokens [slots], log-probs [slots]); the
    program is the one `rows` (the rows read back) need."""
    active = np.zeros(len(slot.temperature), bool)
    active[list(rows)] = True
    return _sample_rows(logits_buf, slot, _mode(slot, active))


@functools.partial(jax.jit, static_argnums=(2,))
def _sample_rows(logits_buf, slot: SlotParams, mode: str):
    u = None if mode == GREEDY else slot_uniforms(slot.seeds, slot.sample_index, slot.token_index)
    return sample_tokens(logits_buf, slot.temperature, slot.top_k, slot.top_p, u, mode)


@functools.partial(jax.jit, donate_argnames=("cache", "logits_buf"))
def copy_rows(cache: Cache, logits_buf, src, dst):
    """Slot dst[i] <- slot src[i] (cache rows, length, pending logits); dst >= slots: no-op."""
    cp = lambda a: a.at[:, dst].set(a[:, jnp.minimum(src, a.shape[1] - 1)], mode="drop")  # noqa: E731
    stacks = jax.tree.map(cp, cache.stacks)
    lengths = cache.lengths.at[dst].set(cache.lengths[jnp.minimum(src, cache.slots - 1)], mode="drop")
    logits_buf = logits_buf.at[dst].set(logits_buf[jnp.minimum(src, logits_buf.shape[0] - 1)], mode="drop")
    return Cache(stacks, lengths), logits_buf


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
    p = min(pow2(len(prompts), min_rows), pow2(slots, min_rows))
    longest = max(len(x) for x in prompts)
    t = min(pow2(longest, min_bucket), chunk)
    total = math.ceil(longest / t) * t
    tokens = np.zeros((p, total), np.int32)
    for i, x in enumerate(prompts):
        tokens[i, : len(x)] = x
    row_ids = np.full((p,), slots, np.int32)
    row_ids[: len(rows)] = rows
    lengths = np.zeros((p,), np.int32)
    lengths[: len(prompts)] = [len(x) for x in prompts]
    key, leaves = w.packed
    for s in range(0, total, t):
        prefix = min(pow2(s + t), cache.max_len)
        cache, logits_buf = _prefill_chunk(key, placement, prefix, leaves, cache, logits_buf, tokens[:, s: s + t],
                                           np.full((p,), s, np.int32), row_ids, lengths)
    return cache, logits_buf


def decode_step(weights, cache: Cache, tokens, active=None, *, placement: Placement = Placement()):
    """Absorbed MLA (or GQA) decode of one token per slot -> (cache, logits [B,V] f32, hidden [B,D])."""
    w = Weights.of(weights)
    active = jnp.ones((cache.slots,), bool) if active is None else active
    return _decode_logits_jit(w.packed[0], placement, True, w.packed[1], cache, jnp.asarray(tokens, jnp.int32),
                              active)


def naive_decode_step(weights, cache: Cache, tokens, active=None, *, placement: Placement = Placement()):
    """`decode_step` with per-head K/V rebuilt from the cached latent (tests only)."""
    w = Weights.of(weights)
    active = jnp.ones((cache.slots,), bool) if active is None else active
    return _decode_logits_jit(w.packed[0], placement, False, w.packed[1], cache, jnp.asarray(tokens, jnp.int32),
                              active)
