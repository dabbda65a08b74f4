"""The continuous-batching engine and the `generate` helper: request bookkeeping on the host
around the compiled steps of `r1jax.sampling.steps`.

    completions = generate(model, prompts, SamplingParams(temperature=0.6, top_p=0.95, max_tokens=512), n=8)

    engine = Engine(model, slots=16, max_len=4096, tokenizer=tok)    # a server thread drives this
    engine.add_request("r1", prompt_ids, SamplingParams(...), on_token=callback)
    while engine.has_work():
        engine.step()            # admits waiting requests, then up to decode_chunk tokens for every active slot

Each `step()` admits waiting requests into free slots (one prefill per length bucket, then each
admitted request's first token), then runs one compiled decode call of up to `decode_chunk`
tokens for every active slot (`steps.decode_chunk`). The host reads back the chunk's tokens,
log-probs and counts, emits the events, checks stop strings (a request that hits one mid-chunk
drops the rest), and admits new requests between calls. While requests wait for a slot, a
call ends as soon as one slot frees, so a long chunk costs no slot time.

`decode_chunk` trades streaming for throughput: each call returns to the host (dispatch,
read-back, bookkeeping: on XLA:CPU a few hundred µs, more than a tiny model's step). A server
streams events and admits new arrivals between calls, so it keeps the default 8; the offline
users (`generate`, GRPO rollouts, rejection sampling, distillation, evaluation), whose requests
are all queued up front, run `BATCH_DECODE_CHUNK` tokens a call.

`n` samples of one prompt (and any identical prompts admitted together) are prefilled once:
the cache rows are copied to the other slots, then each samples its own continuation. Each
request draws its tokens from its own seed and sample index only (`r1jax.sampling.tokens`).

On a single CPU device the engine runs from per-layer weight copies (`Weights.unstacked`, see
`r1jax.sampling.layout`); throughput figures are in the README and `benchmarks/decode.py`.

Departures / left out: no prefix cache across admissions, no paged cache (one max_len row per
slot), no pipelining of host bookkeeping with the next device call.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import secrets
from typing import Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from r1jax.parallel import rules as rules_lib
from r1jax.parallel.rules import MeshAxes
from r1jax.parallel.backend import on_cpu
from r1jax.sampling.cache import Cache, init_cache
from r1jax.sampling.layout import Placement, Weights
from r1jax.sampling.steps import (SlotParams, StopParams, copy_rows, decode_chunk, decode_step, naive_decode_step,
                                  pow2, prefill, sample_rows, sampling_jit)
from r1jax.sampling.tokens import argmax_first, sample_tokens

# Weights, Placement, prefill, decode_step, ... stay importable from here (their old home).
__all__ = ["Cache", "Completion", "Engine", "Event", "Placement", "SamplingParams", "Weights", "argmax_first",
           "decode_step", "generate", "init_cache", "naive_decode_step", "prefill", "sample_tokens", "sampling_jit"]

@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None  # None: a fresh random seed per request
    max_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings, checked on the decoded text (needs a tokenizer)


def _check_sampling(sampling: SamplingParams, sample_index: int) -> None:
    """ValueError for values the compiled sampler cannot take (checked here, so that a bad request
    fails alone instead of failing the step of every request in the engine)."""
    if not (math.isfinite(sampling.temperature) and sampling.temperature >= 0):
        raise ValueError(f"temperature must be finite and >= 0, got {sampling.temperature}")
    if not 0 < sampling.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {sampling.top_p}")
    if not 0 <= sampling.top_k < 2**31:
        raise ValueError(f"top_k must be in [0, 2**31), got {sampling.top_k}")
    if not 0 <= sample_index < 2**31:
        raise ValueError(f"sample_index must be in [0, 2**31), got {sample_index}")


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


BATCH_DECODE_CHUNK = 64  # tokens per decode call for offline users (module docstring)


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
            from r1jax.parallel.sharding import shardings

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
        if mesh is None:
            self.cache, self.logits_buf = jax.device_put((self.cache, self.logits_buf), _home(w))
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
        if self.placement.mesh is None and on_cpu() and w.layers is None:
            w = w.unstacked()
        self._weights = w

    # ------------------------------------------------------------------ requests

    def add_request(self, request_id: Hashable, prompt_ids: Sequence[int], sampling: SamplingParams,
                    on_token: Callable[[Event], None] | None = None, *, sample_index: int = 0) -> None:
        if request_id in self.by_id:
            raise ValueError(f"request {request_id!r} is already in the engine")
        if not 0 < len(prompt_ids) < self.max_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens: need 1..{self.max_len - 1} (max_len)")
        _check_sampling(sampling, sample_index)
        # Any integer seed (OpenAI's are signed 64-bit) folded into the sampler's 32 bits.
        seed = int(sampling.seed) % (1 << 32) if sampling.seed is not None else secrets.randbits(31)
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

    def _slot_arrays(self, slots: Sequence[int]) -> SlotParams:
        n = self.slots
        temp, top_k, top_p = np.zeros(n, np.float32), np.zeros(n, np.int32), np.ones(n, np.float32)
        seeds, sidx, tidx = np.zeros(n, np.uint32), np.zeros(n, np.int32), np.zeros(n, np.int32)
        for s in slots:
            r = self.running[s]
            temp[s], top_k[s], top_p[s] = r.sampling.temperature, r.sampling.top_k, r.sampling.top_p
            seeds[s], sidx[s], tidx[s] = r.seed, r.sample_index, len(r.token_ids)
        return SlotParams(temp, top_k, top_p, seeds, sidx, tidx)

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
            by_bucket[min(pow2(len(req.prompt), self.min_bucket), self.prefill_chunk)].append(req)
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
            self.cache, self.logits_buf = copy_rows(self.cache, self.logits_buf, src, dst)
        for req in admitted:
            self.lengths[req.slot] = len(req.prompt)
        return [r.slot for r in admitted]

    def step(self) -> list[Event]:
        """Admits what fits, then up to decode_chunk tokens for every active slot. Returns the
        events (also passed to each request's `on_token`)."""
        events: list[Event] = []
        admitted = self._admit()
        if admitted:
            tokens, logprobs = jax.device_get(sample_rows(self.logits_buf, self._slot_arrays(admitted), admitted))
            for s in admitted:
                self._emit(s, int(tokens[s]), float(logprobs[s]), events)
        if self.running:
            self._decode(events)
        return events

    def _stop_arrays(self, slots: Sequence[int]) -> StopParams:
        """(max_tokens [B], stop_ids [B,Z] padded with -1; Z a power of two: few compiles)."""
        z = pow2(max(len(self.running[s].sampling.stop_token_ids) for s in slots))
        max_tokens, stop_ids = np.zeros(self.slots, np.int32), np.full((self.slots, z), -1, np.int32)
        for s in slots:
            sp = self.running[s].sampling
            max_tokens[s] = sp.max_tokens
            stop_ids[s, : len(sp.stop_token_ids)] = sp.stop_token_ids
        return StopParams(max_tokens, stop_ids)

    def _decode(self, events: list[Event]) -> None:
        """One compiled call of up to decode_chunk tokens for every running slot, then their events.
        A request the host finishes early (a stop string) drops the rest of its chunk."""
        slots = sorted(self.running)
        active = np.zeros((self.slots,), bool)
        active[slots] = True
        # Attend over a power-of-two prefix of the cache rows that holds every position the chunk
        # can reach (no row goes past its max_tokens).
        left = max(self.running[s].sampling.max_tokens - len(self.running[s].token_ids) for s in slots)
        bucket = min(self.max_len, pow2(int(self.lengths[slots].max()) + min(self.decode_chunk, max(left, 1)), 64))
        self.cache, *out = decode_chunk(self.weights, self.placement, self.decode_chunk, bucket, self.cache,
                                        self.last_token, active, self._slot_arrays(slots), self._stop_arrays(slots),
                                        refill=bool(self.waiting))
        tokens, logprobs, counts = jax.device_get(out)
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


def _home(w: Weights):
    """Where the compiled steps leave the cache and logits of a mesh-less engine: committed to the
    weights' device (a train state's 1-device mesh, replicated). A fresh cache is put there too,
    so the first call's arguments are placed as every later call's: one compile, not two."""
    s = jax.tree.leaves(w.params)[0].sharding
    return NamedSharding(s.mesh, PartitionSpec()) if isinstance(s, NamedSharding) else s


def generate(model_or_state, prompts: list[list[int]], sampling: SamplingParams, n: int = 1, *, tokenizer=None,
             engine: Engine | None = None, slots: int | None = None, max_len: int | None = None,
             **engine_kwargs) -> list[list[Completion]]:
    """n completions of every prompt. Request (i, j) uses the seed `sampling.seed` and sample
    index j, so its tokens do not depend on the other prompts. Builds an `Engine` unless one is
    given (slots and max_len round up to powers of two, so repeated calls reuse compilations)."""
    if engine is None:
        longest = max(len(p) for p in prompts)
        max_len = max_len or pow2(longest + sampling.max_tokens, 64)
        slots = slots or min(pow2(len(prompts) * n, 8), 64)
        engine_kwargs.setdefault("decode_chunk", BATCH_DECODE_CHUNK)
        engine = Engine(model_or_state, slots=slots, max_len=max_len, tokenizer=tokenizer, **engine_kwargs)
    seed = sampling.seed if sampling.seed is not None else secrets.randbits(31)
    sampling = dataclasses.replace(sampling, seed=seed)
    for i, prompt in enumerate(prompts):
        for j in range(n):
            engine.add_request(("generate", i, j), prompt, sampling, sample_index=j)
    while engine.has_work():
        engine.step()
    return [[engine.pop_result(("generate", i, j)) for j in range(n)] for i in range(len(prompts))]
