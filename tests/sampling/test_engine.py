"""The sampling engine on tiny random models: cached decode against full recomputation,
absorbed against naive MLA, the cache's size, batch invariance, continuous batching, stops,
and sharded sampling against one device."""

import time
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.config import MeshConfig
from r1jax.parallel.mesh import make_mesh
from r1jax.sampling import cache as cache_lib
from r1jax.sampling import engine as eng
from r1jax.sampling import steps
from r1jax.sampling.engine import Engine, SamplingParams, generate
from tests.sampling import full_logits, prompts, tiny_gqa, tiny_moe

GREEDY = SamplingParams(temperature=0.0, max_tokens=64)
SAMPLED = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, seed=7, max_tokens=12)
MIXED = (3, 17, 5, 30, 9, 1, 12, 24)  # prompt lengths of the batch of 8


def _check_against_full_forward(model, prompt_list, completions):
    """Every greedy token is the argmax of Decoder.__call__ on the sequence before it, and its
    log-prob the model's (causal, so one forward of each final sequence checks every step)."""
    seqs = [p + c.token_ids for p, c in zip(prompt_list, completions)]
    logits = full_logits(model, seqs, max(len(s) for s in seqs))
    for i, (p, c) in enumerate(zip(prompt_list, completions)):
        steps = logits[i, len(p) - 1: len(p) - 1 + len(c.token_ids)]
        np.testing.assert_array_equal(c.token_ids, steps.argmax(-1))
        lp = jax.nn.log_softmax(steps, axis=-1)[np.arange(len(c.token_ids)), c.token_ids]
        np.testing.assert_allclose(c.logprobs, lp, atol=2e-5)


def test_greedy_equals_full_recompute_mla_moe():
    model = tiny_moe()
    ps = prompts(model.cfg, (5, 20))
    t0 = time.perf_counter()
    out = generate(model, ps, GREEDY, cache_dtype=jnp.float32, slots=2)
    print(f"2 x 64 greedy tokens in {time.perf_counter() - t0:.1f}s (compiles included)")
    assert all(len(c[0].token_ids) == 64 and c[0].finish_reason == "length" for c in out)
    _check_against_full_forward(model, ps, [c[0] for c in out])


def test_greedy_equals_full_recompute_gqa():
    model = tiny_gqa()
    ps = prompts(model.cfg, (4, 11, 7), seed=1)
    out = generate(model, ps, replace(GREEDY, max_tokens=40), cache_dtype=jnp.float32, slots=4)
    _check_against_full_forward(model, ps, [c[0] for c in out])


@pytest.mark.parametrize("unstacked", [False, True])
def test_absorbed_decode_equals_naive(unstacked):
    """Absorbed decode (scanned stacks, or the engine's CPU form: per-layer arrays and head-major
    W_kvb) against naive decode, K/V rebuilt from the latent, over the scanned stacks."""
    model = tiny_moe()
    w = eng.Weights.of(model)
    fast = w.unstacked() if unstacked else w
    ps = prompts(model.cfg, (6, 13, 2, 9), seed=2)
    cache = cache_lib.init_cache(model.cfg, 4, 64, dtype=jnp.float32)
    cache, buf = eng.prefill(w, cache, ps, [0, 1, 2, 3])
    tokens = jnp.argmax(buf, -1)
    for _ in range(3):
        copy = jax.tree.map(jnp.copy, cache)
        cache, logits, _ = eng.decode_step(fast, cache, tokens)
        copy, naive, _ = eng.naive_decode_step(w, copy, tokens)
        np.testing.assert_allclose(logits, naive, atol=1e-5, rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), cache, copy)
        tokens = jnp.argmax(logits, -1)
    assert float(jnp.abs(logits).max()) > 1.0  # logits of a useful scale: the tolerance means something


def test_cache_holds_only_latent_and_rope_key():
    cfg = tiny_moe().cfg
    for dtype in (jnp.bfloat16, jnp.float32):
        cache = cache_lib.init_cache(cfg, 4, 32, dtype=dtype)
        per_token_layer = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * jnp.dtype(dtype).itemsize
        for name, layers in (("dense", cfg.num_dense_layers), ("moe", cfg.num_moe_layers)):
            arrays = cache.stacks[name]
            assert sorted(arrays) == ["c_kv", "k_rope"]
            assert sum(a.nbytes for a in arrays.values()) == per_token_layer * layers * 4 * 32
        assert cache_lib.cache_bytes(cache) == per_token_layer * cfg.num_hidden_layers * 4 * 32
        assert cache_lib.bytes_per_token(cfg, dtype) == per_token_layer * cfg.num_hidden_layers
    # the spec's number for V3: 576 values x 2 bytes x 61 layers
    from r1jax.config import load_model

    assert cache_lib.bytes_per_token(load_model("configs/model/deepseek-v3-671b.yaml")) == 70_272


def _run(model, requests, **kw) -> dict:
    """requests: (id, prompt, sampling, sample_index) -> {id: Completion}, via the Engine."""
    engine = Engine(model, slots=kw.pop("slots", 8), max_len=64, cache_dtype=jnp.float32, **kw)
    for rid, prompt, sp, j in requests:
        engine.add_request(rid, prompt, sp, sample_index=j)
    while engine.has_work():
        engine.step()
    return {rid: engine.pop_result(rid) for rid, *_ in requests}


@pytest.fixture(scope="module")
def batch8():
    """8 requests of mixed lengths, greedy and seeded-sampled, run together on 8 slots."""
    model = tiny_moe()
    ps = prompts(model.cfg, MIXED, seed=3)
    reqs = [(("g", i), p, replace(GREEDY, max_tokens=12), 0) for i, p in enumerate(ps)]
    reqs += [(("s", i), p, replace(SAMPLED, seed=100 + i), 0) for i, p in enumerate(ps)]
    return model, reqs, _run(model, reqs[:8]), _run(model, reqs[8:])


def test_request_alone_equals_batched(batch8):
    model, reqs, greedy, sampled = batch8
    for rid, p, sp, j in (reqs[1], reqs[5], reqs[8 + 3], reqs[8 + 6]):
        alone = _run(model, [(rid, p, sp, j)])[rid]
        together = (greedy if rid[0] == "g" else sampled)[rid]
        assert alone.token_ids == together.token_ids, rid
        np.testing.assert_allclose(alone.logprobs, together.logprobs, atol=1e-5)
    # the sampled requests really sample: not greedy, and log-probs are of the truncated distribution
    g_tokens = [greedy[("g", i)].token_ids for i in range(8)]
    s_tokens = [sampled[("s", i)].token_ids for i in range(8)]
    assert g_tokens != s_tokens
    assert all(lp <= 1e-6 for c in sampled.values() for lp in c.logprobs)


def test_continuous_batching_reuses_slots(batch8):
    """8 requests through 3 slots (admitted as slots free up) give the 8-slot batch's tokens."""
    model, reqs, greedy, sampled = batch8
    few = _run(model, reqs[:8:2] + reqs[9::2], slots=3)
    for rid, c in few.items():
        assert c.token_ids == (greedy if rid[0] == "g" else sampled)[rid].token_ids, rid


def test_n_samples_share_one_prefill_and_match_alone():
    model = tiny_moe()
    (p,) = prompts(model.cfg, (10,), seed=4)
    out = generate(model, [p], SAMPLED, n=3, cache_dtype=jnp.float32, slots=8, max_len=64)[0]
    assert len({tuple(c.token_ids) for c in out}) == 3  # three different samples
    alone = _run(model, [("x", p, SAMPLED, 2)])["x"]
    assert alone.token_ids == out[2].token_ids


class _CharTokenizer:
    vocab_size, bos_id, eos_id, pad_id = 1024, 1, 2, 0

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(65 + i % 26) for i in ids)

    def token_to_id(self, token):
        return None


def test_stops_abort_and_max_tokens():
    model = tiny_moe()
    ps = prompts(model.cfg, (4, 6, 8), seed=5)
    free = _run(model, [("a", ps[0], replace(GREEDY, max_tokens=10), 0)])["a"]
    stop_id = free.token_ids[4]
    tok = _CharTokenizer()
    engine = Engine(model, slots=8, max_len=64, cache_dtype=jnp.float32, tokenizer=tok)
    events = []
    engine.add_request("id", ps[0], replace(GREEDY, stop_token_ids=(stop_id,)), on_token=events.append)
    stop_str = tok.decode(free.token_ids[5:7])
    engine.add_request("str", ps[0], replace(GREEDY, stop=(stop_str,)))
    engine.add_request("gone", ps[1], GREEDY)
    engine.add_request("short", ps[2], replace(GREEDY, max_tokens=3))
    engine.step()
    engine.abort("gone")
    while engine.has_work():
        engine.step()
    by_id = engine.result("id")
    first_stop = free.token_ids.index(stop_id)
    assert by_id.finish_reason == "stop" and by_id.token_ids == free.token_ids[: first_stop + 1]
    assert by_id.text == tok.decode(free.token_ids[:first_stop])
    assert [e.token_id for e in events] == by_id.token_ids and events[-1].finish_reason == "stop"
    by_str = engine.result("str")
    assert by_str.finish_reason == "stop" and stop_str not in by_str.text
    assert tok.decode(by_str.token_ids).endswith(stop_str) or stop_str in tok.decode(by_str.token_ids)
    assert engine.result("short").finish_reason == "length" and len(engine.result("short").token_ids) == 3
    with pytest.raises(KeyError):
        engine.result("gone")
    # A full cache row ends a request with "length".
    (long_prompt,) = prompts(model.cfg, (60,), seed=6)
    out = _run(model, [("full", long_prompt, GREEDY, 0)])["full"]
    assert out.finish_reason == "length" and len(long_prompt) + len(out.token_ids) == 64 + 1


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 8, 1)])
def test_sharded_sampling_equals_single_device(batch8, shape):
    model, reqs, greedy, sampled = batch8
    data, expert, mdl = shape
    mesh = make_mesh(MeshConfig(data=data, expert=expert, model=mdl), jax.devices()[:8])
    cf = model.cfg.n_routed_experts / model.cfg.num_experts_per_tok  # capacity = all local tokens: no drops
    picked = reqs[0:8:3] + reqs[9:16:3]
    out = _run(model, picked, mesh=mesh, capacity_factor=cf)
    for rid, c in out.items():
        want = (greedy if rid[0] == "g" else sampled)[rid]
        assert c.token_ids == want.token_ids, rid
        np.testing.assert_allclose(c.logprobs, want.logprobs, atol=1e-4)


def test_decode_chunk_does_not_change_tokens():
    """decode_chunk=8 (tokens, stops and lengths decided on device) against decode_chunk=1 (one
    token per compiled call, every stop decided on the host): identical tokens (log-probs to
    float rounding) for a mixed batch with stop tokens hit mid-chunk, different max_tokens, a full cache row, and
    more requests than slots (admitted between chunks). The same with the offline chunk
    (BATCH_DECODE_CHUNK), whose calls end as soon as a slot frees while requests wait."""
    model = tiny_moe()
    ps = prompts(model.cfg, MIXED + (58,), seed=7)
    free = _run(model, [("free", ps[0], replace(GREEDY, max_tokens=20), 0)])["free"].token_ids
    sampled = replace(SAMPLED, max_tokens=20)
    reqs = [(("g", 0), ps[0], replace(GREEDY, max_tokens=20, stop_token_ids=(free[5], free[13])), 0),
            (("g", 1), ps[1], replace(GREEDY, max_tokens=3), 0),
            (("g", 2), ps[2], replace(GREEDY, max_tokens=17), 0),
            (("g", 3), ps[8], GREEDY, 0)]  # 58-token prompt: stops on the full cache row
    reqs += [(("s", i), p, replace(sampled, seed=i, max_tokens=5 + 3 * i, stop_token_ids=(free[i],)), i % 2)
             for i, p in enumerate(ps[3:8])]
    one = _run(model, reqs, slots=4, decode_chunk=1)
    eight = _run(model, reqs, slots=4, decode_chunk=8)
    batch = _run(model, reqs, slots=4, decode_chunk=eng.BATCH_DECODE_CHUNK)
    assert one[("g", 0)].finish_reason == "stop" and len(one[("g", 0)].token_ids) == 6
    assert one[("g", 1)].token_ids and len(one[("g", 1)].token_ids) == 3
    assert one[("g", 3)].finish_reason == "length" and len(one[("g", 3)].token_ids) == 64 - 58 + 1
    for rid, c in one.items():
        for chunked in (eight, batch):
            assert chunked[rid].token_ids == c.token_ids, rid
            assert chunked[rid].finish_reason == c.finish_reason, rid
            # same tokens; log-probs to float rounding (XLA fuses a 1-trip loop differently)
            np.testing.assert_allclose(chunked[rid].logprobs, c.logprobs, atol=1e-5, err_msg=str(rid))


def test_a_long_chunk_ends_when_a_slot_frees_for_a_waiting_request():
    """Two slots, three requests: the first decode call (chunk 64) stops when the short request
    finishes, so the third is admitted then, not after the long one's 29 more tokens."""
    model = tiny_moe()
    short, long_, third = prompts(model.cfg, (4, 6, 5), seed=11)
    engine = Engine(model, slots=2, max_len=64, cache_dtype=jnp.float32, decode_chunk=eng.BATCH_DECODE_CHUNK)
    engine.add_request("short", short, replace(GREEDY, max_tokens=3))
    engine.add_request("long", long_, replace(GREEDY, max_tokens=30))
    engine.add_request("third", third, replace(GREEDY, max_tokens=4))
    engine.step()
    assert engine.decode_steps == 2 and len(engine.result("long").token_ids) == 3  # first token + 2
    engine.step()
    assert engine.result("third").token_ids  # admitted by the second step
    while engine.has_work():
        engine.step()
    assert [len(engine.result(r).token_ids) for r in ("short", "long", "third")] == [3, 30, 4]


def test_sampler_truncation_and_distribution_against_numpy():
    """sample_tokens on fixed logits, 4000 draws a row: top-k and top-p rows draw only from the set
    a NumPy sort gives, with log-probs of that renormalised set; an untruncated row's draws
    follow softmax(logits / T), and are the same uniforms' draws whether or not other rows in its
    batch asked for truncation (the sort runs only then)."""
    v, n = 32, 4000
    logits = np.random.default_rng(0).normal(0, 2, v).astype(np.float32)
    uniforms = jax.random.uniform(jax.random.key(1), (n,))

    def draw(temperature, top_k, top_p):
        full = lambda x, dt: jnp.full((n,), x, dt)  # noqa: E731
        toks, lps = eng.sample_tokens(jnp.broadcast_to(logits, (n, v)), full(temperature, jnp.float32),
                                      full(top_k, jnp.int32), full(top_p, jnp.float32), uniforms)
        return np.asarray(toks), np.asarray(lps)

    order = np.argsort(-logits)
    probs = np.exp(logits / 0.8 - (logits / 0.8).max())
    probs /= probs.sum()
    # top-k 3
    toks, lps = draw(0.8, 3, 1.0)
    assert set(toks) <= set(order[:3]) and len(set(toks)) == 3
    p3 = probs[order[:3]] / probs[order[:3]].sum()
    log_p3 = dict(zip(order[:3].tolist(), np.log(p3)))
    np.testing.assert_allclose(lps, [log_p3[t] for t in toks.tolist()], rtol=1e-4)
    # top-p 0.6: the smallest prefix of the sorted probabilities whose mass reaches 0.6
    nucleus = order[: int(np.searchsorted(np.cumsum(probs[order]), 0.6) + 1)]
    toks, _ = draw(0.8, 0, 0.6)
    assert set(toks) == set(nucleus)
    # untruncated: frequencies follow softmax(logits / T)
    toks, lps = draw(0.8, 0, 1.0)
    freq = np.bincount(toks, minlength=v) / n
    assert np.abs(freq - probs).max() < 0.03
    np.testing.assert_allclose(lps, np.log(probs[toks]), rtol=1e-4, atol=1e-5)
    # the same draws, with every other row asking for top-k: the untruncated rows draw the same
    mixed_k = jnp.asarray(np.where(np.arange(n) % 2 == 0, 0, 3), jnp.int32)
    mixed, _ = eng.sample_tokens(jnp.broadcast_to(logits, (n, v)), jnp.full((n,), 0.8), mixed_k,
                                 jnp.ones((n,)), uniforms)
    np.testing.assert_array_equal(np.asarray(mixed)[::2], toks[::2])


def test_argmax_first_equals_numpy_with_ties_and_infinities():
    """The sampler's argmax (two plain reductions) is NumPy's: the first maximum, also when a row's
    maximum repeats, and with -inf entries (masked logits)."""
    x = np.random.default_rng(0).integers(-3, 4, (64, 37)).astype(np.float32)  # many ties
    x[::5, ::3] = -np.inf
    x[1] = -np.inf  # a row with nothing but -inf
    got = jax.jit(eng.argmax_first)(x)
    np.testing.assert_array_equal(np.asarray(got), np.argmax(x, axis=-1))
    assert got.dtype == jnp.int32


@pytest.mark.parametrize("unstacked", [False, True])
def test_decode_updates_the_cache_in_place(unstacked):
    """The compiled decode loop holds no copy of any cache array: each layer writes its entries
    before it reads them back. (Reading first, XLA copied every cache array of straight-line
    layers, here the one-layer dense stack and tiny-moe's unrolled MoE layers, at every step.)"""
    model = tiny_moe()
    w = eng.Weights.of(model)
    w = w.unstacked() if unstacked else w
    slots, max_len = 4, 64
    cache = cache_lib.init_cache(model.cfg, slots, max_len)
    z = np.zeros(slots, np.int32)
    hlo = steps.decode_chunk.lower(
        w, eng.Placement(), 4, max_len, cache, z, np.ones(slots, bool),
        steps.SlotParams(np.zeros(slots, np.float32), z, np.ones(slots, np.float32), z.astype(np.uint32), z, z),
        steps.StopParams(np.full(slots, 8, np.int32), np.full((slots, 1), -1, np.int32))).compile().as_text()
    shapes = {f"u16[{','.join(map(str, a.shape))}]" for s in cache.stacks.values() for a in s.values()}
    copies = [line for line in hlo.splitlines() if " copy(" in line and any(sh in line for sh in shapes)]
    assert not copies, copies[:2]
