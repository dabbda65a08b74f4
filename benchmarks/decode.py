"""Decode / prefill throughput and cache bytes per token of the sampling engine, side by side with
Hugging Face transformers (`DeepseekV3ForCausalLM.generate`, torch CPU, float32) on the same weights.

    python benchmarks/decode.py                                   # tiny-moe, r1jax vs HF
    python benchmarks/decode.py --configs tiny-moe small-moe --steps 32
    taskset -c 0 python benchmarks/decode.py --configs small-moe --steps 16 --skip-mtp  # one core each
    python benchmarks/decode.py --configs small-moe --skip-hf     # r1jax only (+ MTP speculative)
    python benchmarks/decode.py --checkpoint runs/demo/sft --steps 96   # trained weights (`make demo`)

Per config, one r1jax model with random weights (filled from NumPy, no init compiles) and the
same weights in transformers (`r1jax.interop.hf.to_hf_state_dict` + `load_state_dict`); the
last-token logits of the prefill batch are compared to show the two run the same model. Both
compute in float32 by default (`--dtype config` keeps the yaml's, e.g. small-moe's bfloat16,
which XLA:CPU runs several times slower than float32). torch gets one intra-op thread per CPU
this process may use (`--torch-threads`); on a loaded machine multi-threaded torch can be 10x
slower than one thread (spinning barriers), so pin with `taskset` for a like-for-like run.

  prefill tok/s   8 prompts x --prefill-len tokens, one call, best of 3 (r1jax: `engine.prefill`;
                  HF: one forward with use_cache=True, logits of the last token only)
  decode tok/s    batch 1 and 16 after a 16-token prompt, greedy, --steps tokens per row.
                  r1jax: `Engine.step` (host loop included), --decode-chunk tokens per compiled
                  call, timed after the admitting step; HF: greedy `generate`, no early stop,
                  rate = batch * steps / (time of steps + 1 new tokens - time of 1 new token)
  cache B/token   r1jax: bytes of the allocated cache arrays / (slots x max_len), bf16 (the
                  engine's default cache dtype, also for float32 models); HF: bytes of the
                  DynamicCache tensors after the prefill forward / (batch x tokens), float32 as
                  run; the "bf16" column is the same layout at 2 bytes a value (like for like)

A weight-read ceiling per config bounds every decode column: batch x measured memory bandwidth
(a jitted f32 matvec over 256 MiB) / the weight bytes a step must read (active parameters less the
embedding table, experts as a batch is expected to choose them). "ceiling vs HF" is the largest
speed-up over HF that this machine allows at that batch, whatever the framework.

A last section compares one layer with V3's attention shapes (128 heads, q/kv ranks 1536/512,
head dims 128/64/128; dense FFN, small vocab): r1jax's cache from `jax.eval_shape` of the
layout (nothing allocated), HF's measured from a real forward, and the per-head K/V a cache of
the expanded keys and values would hold (H x (nope + rope + v) values a token and layer). Note
that transformers 5.x's `DeepseekV3Attention` (checked on 5.24) caches the compressed latent too
(kv_nope [L] as "keys" and k_rot [R] as "values" per token and layer, re-expanded through
kv_b_proj at every step), so HF's cache is as small as r1jax's at the same dtype; the ~70x is
against the per-head layout, which is what transformers 4.x's DeepseekV3 cached.

MTP speculative rows (r1jax only; HF's generate has no MTP drafter): `speculative_generate`
at batch 1 and 16 on the decode prompts, greedy, and its ratio to plain decode. With random
weights the MTP's drafts are almost never accepted, so those rows measure the overhead of
drafting, not its gain; `--checkpoint RUN_DIR` loads a training run's weights instead (the
run's model config; decode prompts are the built-in tasks' held-out prompts of one token
length), where acceptance is real.

Caveats: random weights unless --checkpoint; times exclude
compilation / warm-up (one run each); CPU timings on a shared machine are noisy; r1jax's decode
attends over a power-of-two prefix of its cache rows (masked), HF over the tokens so far.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from r1jax.config import ModelConfig, load_model
from r1jax.interop.hf import to_hf_state_dict
from r1jax.model.decoder import Decoder
from r1jax.parallel.backend import on_cpu
from r1jax.model.summary import count_params, kv_cache_bytes_per_token, mha_cache_bytes_per_token
from r1jax.sampling import cache as cache_lib
from r1jax.sampling import engine as eng
from r1jax.sampling.speculative import speculative_generate

DECODE_PROMPT = 16  # prompt length before the decode measurements (both frameworks)
PREFILL_ROWS = 8
BATCHES = (1, 16)
REPEATS = 3  # decode and prefill timings: best of this many (both frameworks)

# One layer with DeepSeek-V3's attention shapes; a small dense FFN and vocab keep it cheap.
V3_ATTENTION = ModelConfig(
    vocab_size=256, hidden_size=7168, num_hidden_layers=1, num_attention_heads=128, intermediate_size=256,
    q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
)


# ----------------------------------------------------------------------------- r1jax


def random_model(cfg, seed=0) -> Decoder:
    rng = np.random.default_rng(seed)
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)

    def fill(leaf):
        fan_in = leaf.shape[-2] if len(leaf.shape) >= 2 else 1
        return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) * fan_in**-0.5, leaf.dtype)

    params = jax.tree.map(fill, params)
    rest = jax.tree.map(lambda b: jnp.zeros(b.shape, b.dtype), rest)
    return nnx.merge(graphdef, params, rest)


def decode_prompts(batch: int) -> list[list[int]]:
    return [[3 + i] * DECODE_PROMPT for i in range(batch)]


def trained_model(run_dir: str):
    """(model config, Decoder computing in f32, task prompts) from a training run's newest
    checkpoint (e.g. runs/demo/sft): the built-in tasks' held-out prompts in the chat template,
    those of the most common token length (HF's generate then needs no padding), at least 16."""
    from collections import Counter
    from pathlib import Path

    from r1jax import checkpoint as ckpt_lib
    from r1jax import config as config_lib
    from r1jax.data.datasets import TOKENIZER_FILE
    from r1jax.data.tokenizer import SentencePieceTokenizer
    from r1jax.train.grpo import prompt_records
    from r1jax.train.step import TrainStep

    meta = ckpt_lib.read_meta(run_dir)
    cfg = config_lib.build(config_lib.Config, meta["config"])
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="float32"))
    step = TrainStep(cfg)
    params, extra = ckpt_lib.load_params(run_dir, (step.abstract.params, step.abstract.extra))
    tok_file = next(Path(c) for c in (meta.get("tokenizer"), cfg.data.tokenizer, Path(run_dir) / TOKENIZER_FILE)
                    if c and Path(c).is_file())
    records = prompt_records(cfg, SentencePieceTokenizer(tok_file), "eval", 512)
    length, _ = Counter(len(r["prompt_ids"]) for r in records).most_common(1)[0]
    prompts = [r["prompt_ids"] for r in records if len(r["prompt_ids"]) == length]
    if len(prompts) < max(BATCHES):
        raise SystemExit(f"{run_dir}: only {len(prompts)} task prompts of one length; need {max(BATCHES)}")
    return cfg.model, nnx.merge(step.graphdef, params, extra), prompts


def prefill_prompts(cfg, batch: int, length: int) -> list[list[int]]:
    return [list(np.random.default_rng(i).integers(3, cfg.vocab_size, length)) for i in range(batch)]


def decode_rate(w, prompts, batch: int, steps: int, max_len: int, chunk: int) -> float:
    """Tokens/s of `Engine.step` with `batch` greedy requests decoding (host bookkeeping and the
    per-chunk readback included): the tokens of the steps after the first (which admits the
    requests: prefill, first token, first chunk) over their time."""
    engine = eng.Engine(w, slots=batch, max_len=max_len, decode_chunk=chunk)
    sampling = eng.SamplingParams(temperature=0.0, max_tokens=1 + chunk + steps)

    def run() -> float:
        for i, p in enumerate(prompts[:batch]):
            engine.add_request(i, p, sampling)
        engine.step()
        start, tokens = time.perf_counter(), 0
        while engine.has_work():
            tokens += len(engine.step())
        elapsed = time.perf_counter() - start
        for i in range(batch):
            engine.pop_result(i)
        return tokens / elapsed

    run()  # compile (every attention bucket the run reaches)
    return max(run() for _ in range(REPEATS))


def speculative_rate(w, prompts, steps: int, max_len: int, chunk: int):
    """`speculative_generate` (greedy, bf16 cache as the engine's, `chunk` verify steps per call)
    of steps + 1 tokens a row, the best of REPEATS after a compiling run: tokens after the
    first over the decode loop's time (`SpeculativeResult.tokens_per_second`)."""
    def run():
        return speculative_generate(w, prompts, steps + 1, max_len=max_len, cache_dtype=jnp.bfloat16, chunk=chunk)

    run()
    return max((run() for _ in range(REPEATS)), key=lambda r: r.tokens_per_second)


def prefill_rate(w, cfg, batch: int, length: int, max_len: int) -> tuple[float, np.ndarray]:
    """Tokens/s of one prefill call (best of REPEATS), and the last-token logits [batch, V] it leaves."""
    prompts = prefill_prompts(cfg, batch, length)
    cache = cache_lib.init_cache(cfg, batch, max_len)
    cache, buf = eng.prefill(w, cache, prompts, list(range(batch)), chunk=length)  # compile
    jax.block_until_ready(buf)
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        cache, buf = eng.prefill(w, cache, prompts, list(range(batch)), buf, chunk=length)
        jax.block_until_ready(buf)
        best = min(best, time.perf_counter() - start)
    return batch * length / best, np.asarray(buf, np.float32)


def stream_bandwidth() -> float:
    """GB/s of a jitted float32 matrix-vector product over 256 MiB (best of 10): about what a
    memory-bound decode step can read."""
    w = jnp.ones((8192, 8192), jnp.float32)
    x = jnp.ones((1, 8192), jnp.float32)
    f = jax.jit(lambda x, w: x @ w)
    f(x, w).block_until_ready()
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        f(x, w).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return w.nbytes / best / 1e9


def decode_weight_bytes(cfg, batch: int, itemsize: int = 4) -> float:
    """Weight bytes one decode step of `batch` tokens must read: the active parameters less the
    embedding table (a row a token) and the routed experts, plus the experts the batch is
    expected to choose (uniform routing: E (1 - (1 - K/E)^B) of them a layer). Both frameworks
    read these; the KV cache (short prompts here) is left out."""
    count = count_params(cfg)
    embed = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    params = count.active - embed
    if cfg.is_moe:
        e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
        per_layer = 3 * cfg.hidden_size * cfg.moe_intermediate_size
        params += cfg.num_moe_layers * per_layer * (e * (1 - (1 - k / e) ** batch) - k)
    return params * itemsize


def r1jax_cache_bytes_per_token(cfg, slots: int = 1, max_len: int = 64) -> int:
    """From the cache layout (`jax.eval_shape`: nothing allocated), checked against the summary."""
    shapes = jax.eval_shape(lambda: cache_lib.init_cache(cfg, slots, max_len))
    total = sum(int(np.prod(a.shape)) * a.dtype.itemsize for s in shapes.stacks.values() for a in s.values())
    per_token = total // (slots * max_len)
    assert per_token == kv_cache_bytes_per_token(cfg) == cache_lib.bytes_per_token(cfg), per_token
    return per_token


# ----------------------------------------------------------------------------- transformers


def hf_config(cfg: ModelConfig):
    """The `transformers.DeepseekV3Config` of an MLA `ModelConfig` (the inverse of
    `r1jax.interop.hf.config_from_hf` for DeepSeek models; float32, sdpa attention, no MTP)."""
    import transformers

    if not cfg.is_mla:
        raise ValueError("the HF side-by-side covers MLA (DeepseekV3) configs only")
    if cfg.rope_scaling is None:
        rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    elif cfg.rope_scaling.type == "yarn":
        rs = cfg.rope_scaling
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": rs.factor,
                "original_max_position_embeddings": rs.original_max_position_embeddings,
                "beta_fast": rs.beta_fast, "beta_slow": rs.beta_slow, "mscale": rs.mscale,
                "mscale_all_dim": rs.mscale_all_dim}
    else:
        raise ValueError(f"rope_scaling {cfg.rope_scaling.type} has no DeepseekV3 equivalent")
    if cfg.is_moe:
        if (cfg.scoring_func, cfg.topk_method) != ("sigmoid", "noaux_tc"):
            raise ValueError("transformers' DeepseekV3 routes with sigmoid scores and noaux_tc only")
        ffn = {"n_routed_experts": cfg.n_routed_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
               "moe_intermediate_size": cfg.moe_intermediate_size, "n_shared_experts": cfg.n_shared_experts,
               "n_group": cfg.n_group, "topk_group": cfg.topk_group,
               "routed_scaling_factor": cfg.routed_scaling_factor, "norm_topk_prob": cfg.norm_topk_prob,
               "first_k_dense_replace": cfg.num_dense_layers}
    else:  # every layer dense; the MoE fields are unused
        ffn = {"n_routed_experts": 1, "num_experts_per_tok": 1, "n_group": 1, "topk_group": 1, "n_shared_experts": 1,
                   "moe_intermediate_size": 1, "first_k_dense_replace": cfg.num_hidden_layers}
    return transformers.DeepseekV3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        rope_parameters=rope, rope_interleave=cfg.rope_interleave, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings, num_mtp_layers=0,
        bos_token_id=None, eos_token_id=None, pad_token_id=0, attn_implementation="sdpa", **ffn,
    )


def hf_model(cfg: ModelConfig, state: dict[str, np.ndarray] | None = None):
    """`DeepseekV3ForCausalLM` in float32, eval mode, holding `state` (an HF state dict) when given;
    built without transformers' weight init (every tensor is overwritten)."""
    import torch
    import transformers
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = transformers.DeepseekV3ForCausalLM(hf_config(cfg))
    model = model.to(torch.float32).eval()
    if state is not None:
        model.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()}, strict=True)
    model.generation_config.eos_token_id = None  # greedy to the last token, no early stop
    model.generation_config.pad_token_id = 0
    return model


def hf_cache_bytes(cache) -> tuple[int, int, dict[str, tuple[int, ...]]]:
    """(bytes as stored, values stored, {"keys"/"values": shape of layer 0}) of a DynamicCache."""
    layers = cache.layers
    nbytes = sum(t.nbytes for layer in layers for t in (layer.keys, layer.values))
    values = sum(t.numel() for layer in layers for t in (layer.keys, layer.values))
    return nbytes, values, {"keys": tuple(layers[0].keys.shape), "values": tuple(layers[0].values.shape)}


def hf_prefill(model, prompts: list[list[int]]):
    """(tokens/s of one forward over the prompt batch with use_cache=True (best of REPEATS),
    last-token logits, cache)."""
    import torch

    ids = torch.tensor(prompts, dtype=torch.long)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)  # warm-up
        elapsed = float("inf")
        for _ in range(REPEATS):
            start = time.perf_counter()
            out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
            elapsed = min(elapsed, time.perf_counter() - start)
    return ids.numel() / elapsed, out.logits[:, -1].float().numpy(), out.cache


def hf_decode_rate(model, prompts, batch: int, steps: int) -> float:
    """Greedy `generate` tokens/s: batch * steps / (t(steps + 1 new) - t(1 new)); the difference
    takes out the prefill and the first token."""
    import torch

    ids = torch.tensor(prompts[:batch], dtype=torch.long)
    mask = torch.ones_like(ids)

    def run(new: int) -> float:
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
        elapsed = time.perf_counter() - start
        assert out.shape == (batch, ids.shape[1] + new), out.shape
        return elapsed

    with torch.inference_mode():
        run(2)  # warm-up
        first = min(run(1) for _ in range(REPEATS))
        total = min(run(steps + 1) for _ in range(REPEATS))
    return batch * steps / max(total - first, 1e-9)


# ----------------------------------------------------------------------------- report


def row(config: str, framework: str, **cells) -> dict:
    return {"config": config, "framework": framework, **cells}


def torch_dtype_name(cache) -> str:
    return str(cache.layers[0].keys.dtype).removeprefix("torch.")


def bench_config(name: str, args) -> tuple[list[dict], list[str]]:
    t0 = time.perf_counter()
    if args.checkpoint:
        cfg, model, prompts = trained_model(args.checkpoint)
        name, kind = args.checkpoint.rstrip("/"), "trained"
    else:
        cfg = load_model(f"configs/model/{name}.yaml")
        if args.dtype != "config":
            cfg = dataclasses.replace(cfg, dtype=args.dtype)
        model, prompts, kind = random_model(cfg), decode_prompts(max(BATCHES)), "random"
    w = eng.Weights.of(model)
    if on_cpu():
        w = w.unstacked()  # what `Engine` runs on one CPU device, for prefill too
    head = (f"{name}: {cfg.num_hidden_layers} layers, width {cfg.hidden_size}, vocab {cfg.vocab_size}, "
            f"r1jax compute {cfg.dtype} / params {cfg.param_dtype}; {kind} weights in {time.perf_counter() - t0:.1f}s; "
            f"decode prompts of {len(prompts[0])} tokens")
    notes = [head]
    cache_bpt = r1jax_cache_bytes_per_token(cfg)
    pf, pf_logits = prefill_rate(w, cfg, PREFILL_ROWS, args.prefill_len, args.max_len)
    ours = row(name, "r1jax", prefill=pf, cache=cache_bpt, cache_bf16=cache_bpt, cache_dtype="bf16")
    for b in BATCHES:
        ours[f"b{b}"] = decode_rate(w, prompts, b, args.steps, args.max_len, args.decode_chunk)
    rows = [ours]
    notes.append(f"  r1jax done in {time.perf_counter() - t0:.0f}s")
    bw = args.bandwidth
    itemsize = jnp.dtype(cfg.param_dtype).itemsize
    ceiling = {f"b{b}": b * bw * 1e9 / decode_weight_bytes(cfg, b, itemsize) for b in BATCHES}
    notes.append("  weights a decode step reads: " + ", ".join(
        f"b{b} {decode_weight_bytes(cfg, b, itemsize) / 1e6:,.0f} MB" for b in BATCHES)
        + f"; at {bw:.1f} GB/s the memory-bound ceiling is "
        + ", ".join(f"b{b} {ceiling[f'b{b}']:,.0f} tok/s" for b in BATCHES))
    ceiling_row = row(name, "weight-read ceiling", **ceiling)

    spec_rows = []
    if cfg.num_nextn_predict_layers and not args.skip_mtp:
        spec = row(name, "r1jax MTP speculative")
        for b in BATCHES:
            res = speculative_rate(w, prompts[:b], args.steps, args.max_len, args.decode_chunk)
            spec[f"b{b}"] = res.tokens_per_second
            notes.append(f"  r1jax MTP speculative, batch {b}: acceptance {res.acceptance_rate:.3f}, "
                         f"{res.steps} verify steps for {args.steps} tokens a row"
                         + (" (random weights: drafting overhead, not gain)" if kind == "random" else ""))
        spec_rows = [spec, row(name, "MTP speculative vs plain", ratio=True,
                               **{f"b{b}": spec[f"b{b}"] / ours[f"b{b}"] for b in BATCHES})]
    rows += spec_rows

    if not args.skip_hf and cfg.is_mla:
        import torch
        import transformers

        t1 = time.perf_counter()
        hf = hf_model(cfg, to_hf_state_dict(model))
        del model
        pf_hf, hf_logits, hf_cache = hf_prefill(hf, prefill_prompts(cfg, PREFILL_ROWS, args.prefill_len))
        nbytes, values, shapes = hf_cache_bytes(hf_cache)
        tokens = PREFILL_ROWS * args.prefill_len
        theirs = row(name, f"HF {transformers.__version__}", prefill=pf_hf, cache=nbytes / tokens,
                     cache_bf16=2 * values / tokens, cache_dtype=torch_dtype_name(hf_cache))
        for b in BATCHES:
            theirs[f"b{b}"] = hf_decode_rate(hf, prompts, b, args.steps)
        rows.append(theirs)
        diff = np.abs(pf_logits - hf_logits).max()
        notes.append(f"  HF ({torch.get_num_threads()} torch threads) done in {time.perf_counter() - t1:.0f}s; "
                     f"cache layer 0 {shapes}; prefill last-token logits max |r1jax - HF| = {diff:.2g} "
                     f"(scale {np.abs(hf_logits).max():.3g}; same argmax in "
                     f"{(pf_logits.argmax(-1) == hf_logits.argmax(-1)).mean():.0%} of rows)")
        rows.append(row(name, "r1jax vs HF", ratio=True, **{k: ours[k] / theirs[k] for k in ("prefill", "b1", "b16")},
                        cache=theirs["cache"] / ours["cache"], cache_bf16=theirs["cache_bf16"] / ours["cache_bf16"]))
        rows.append(ceiling_row)
        rows.append(row(name, "ceiling vs HF", ratio=True, **{k: ceiling[k] / theirs[k] for k in ("b1", "b16")}))
        del hf
    else:
        rows.append(ceiling_row)
    return rows, notes


def v3_attention_rows(skip_hf: bool) -> tuple[list[dict], list[str]]:
    """Cache bytes per token of one layer with V3's attention shapes."""
    import transformers

    cfg = V3_ATTENTION
    name = "v3-attn-1L"
    ours = r1jax_cache_bytes_per_token(cfg)
    rows = [row(name, "r1jax", cache=ours, cache_bf16=ours, cache_dtype="bf16")]
    notes = []
    if not skip_hf:
        import torch

        t0 = time.perf_counter()
        hf = hf_model(cfg)  # weights left uninitialised: only the cache shapes matter
        for p in hf.parameters():
            p.data.normal_(0, 0.01)
        ids = torch.arange(8, dtype=torch.long)[None] + 3
        with torch.inference_mode():
            out = hf(input_ids=ids, use_cache=True, logits_to_keep=1)
        nbytes, values, shapes = hf_cache_bytes(out.cache)
        n = ids.numel()
        rows.append(row(name, f"HF {transformers.__version__}", cache=nbytes / n, cache_bf16=2 * values / n,
                        cache_dtype=torch_dtype_name(out.cache)))
        notes.append(f"{name}: HF cache layer 0 {shapes} (latent: kv_nope [L] as keys, k_rot [R] as values); "
                     f"built and run in {time.perf_counter() - t0:.0f}s")
        del hf, out
    per_head = mha_cache_bytes_per_token(cfg)  # bf16: H x (nope + rope + v) values
    rows.append(row(name, "per-head K+V", cache=per_head, cache_bf16=per_head, cache_dtype="bf16"))
    notes.append(f"{name}: per-head K+V / r1jax latent = {per_head / ours:.1f}x "
                 f"({cfg.num_attention_heads} x ({cfg.qk_head_dim} + {cfg.v_head_dim}) vs "
                 f"{cfg.kv_lora_rank} + {cfg.qk_rope_head_dim} values a token and layer)")
    return rows, notes


def table(rows: list[dict]) -> str:
    cols = [("config", "config"), ("framework", "framework"), ("prefill", "prefill tok/s"),
            ("b1", "decode tok/s b1"), ("b16", "decode tok/s b16"), ("cache", "cache B/tok (as run)"),
            ("cache_bf16", "cache B/tok (bf16)")]

    def cell(row, key):
        v = row.get(key)
        if v is None:
            return "-"
        if isinstance(v, str):
            return v
        if row.get("ratio"):
            return f"{v:.2f}x"
        if key == "cache":
            return f"{v:,.0f} ({row['cache_dtype']})"
        return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}"

    body = [[cell(r, k) for k, _ in cols] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, (_, h) in enumerate(cols)]

    def line(xs):
        return "  ".join(x.ljust(wd) if i < 2 else x.rjust(wd) for i, (x, wd) in enumerate(zip(xs, widths)))

    return "\n".join([line([h for _, h in cols]), line(["-" * wd for wd in widths])] + [line(b) for b in body])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=["tiny-moe"], help="names under configs/model/")
    ap.add_argument("--steps", type=int, default=64, help="decode steps per measurement")
    ap.add_argument("--prefill-len", type=int, default=128)
    ap.add_argument("--max-len", type=int, default=512, help="r1jax cache row length")
    ap.add_argument("--decode-chunk", type=int, default=8, help="r1jax tokens per compiled decode call")
    ap.add_argument("--skip-hf", action="store_true", help="r1jax only")
    ap.add_argument("--skip-mtp", action="store_true", help="no MTP speculative rows")
    ap.add_argument("--checkpoint", help="a training run (e.g. runs/demo/sft): its trained weights and model "
                                         "instead of --configs with random ones, task prompts for decode")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "config"],
                    help="r1jax compute dtype (default float32, as HF runs; `config`: the yaml's)")
    ap.add_argument("--torch-threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="torch intra-op threads (default: the CPUs this process may use; "
                         "`taskset -c 0 ...` runs both frameworks on one core)")
    args = ap.parse_args()
    if not args.skip_hf:
        import torch

        torch.set_num_threads(args.torch_threads)
    print(f"{jax.device_count()} x {jax.devices()[0].platform}, {len(os.sched_getaffinity(0))} of {os.cpu_count()} "
          f"CPUs usable, load average {os.getloadavg()[0]:.1f}; "
          f"decode after a {DECODE_PROMPT}-token prompt (task prompts with --checkpoint), {args.steps} steps; "
          f"prefill {PREFILL_ROWS} x {args.prefill_len}")
    args.bandwidth = stream_bandwidth()
    print(f"memory bandwidth: {args.bandwidth:.1f} GB/s (jitted f32 matvec over 256 MiB, best of 10)")
    rows, notes = [], []
    for name in [args.checkpoint] if args.checkpoint else args.configs:
        r, n = bench_config(name, args)
        rows += r
        notes += n
        print("\n".join(n), flush=True)
    r, n = v3_attention_rows(args.skip_hf)
    rows += r
    print("\n".join(n))
    print()
    print(table(rows))
    if any(r.get("ratio") for r in rows):
        print("r1jax vs HF rows: throughput ratios r1jax over HF (> 1: r1jax faster); cache columns HF over r1jax "
              "(> 1: r1jax's cache smaller)")
        print("weight-read ceiling: batch x bandwidth / weight bytes a step reads, what no framework exceeds "
              "while decode is memory-bound; ceiling vs HF: the most any framework could beat HF by here")


if __name__ == "__main__":
    main()
