"""Decode / prefill throughput, cache bytes per token and MTP acceptance of the sampling engine.

    python benchmarks/decode.py                      # tiny-moe
    python benchmarks/decode.py --config small-moe --steps 16

Random weights (filled from NumPy, no init compiles): throughput is real, but acceptance of
MTP drafts from an untrained MTP module is near zero, so the speculative row measures the
overhead of drafting, not its gain. Times exclude compilation (one warm-up call each).
Not done here: an HF transformers side-by-side.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from r1jax.config import load_model
from r1jax.model.decoder import Decoder
from r1jax.sampling import cache as cache_lib
from r1jax.sampling import engine as eng
from r1jax.sampling.speculative import speculative_generate


def random_model(cfg, seed=0) -> Decoder:
    rng = np.random.default_rng(seed)
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)

    def fill(leaf):
        fan_in = leaf.shape[-2] if len(leaf.shape) >= 2 else 1
        return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) * fan_in**-0.5, leaf.dtype)

    params = jax.tree.map(fill, params)
    rest = jax.tree.map(lambda b: jnp.zeros(b.shape, b.dtype), rest)
    return nnx.merge(graphdef, params, rest)


def decode_rate(w, cfg, batch: int, steps: int, max_len: int) -> float:
    """Tokens/s of the compiled decode + sample step with `batch` active slots."""
    cache = cache_lib.init_cache(cfg, batch, max_len)
    prompts = [[3 + i] * 16 for i in range(batch)]
    cache, _ = eng.prefill(w, cache, prompts, list(range(batch)))
    args = (np.zeros(batch, np.float32), np.zeros(batch, np.int32), np.ones(batch, np.float32),
            np.zeros(batch, np.uint32), np.zeros(batch, np.int32), np.zeros(batch, np.int32))
    tokens, active = jnp.zeros(batch, jnp.int32), jnp.ones(batch, bool)

    def step(c, t):
        return eng._decode_and_sample(w.graphdef, eng.Placement(), w.params, w.extra, c, t, active, *args)

    cache, tokens, _ = step(cache, tokens)  # compile
    jax.block_until_ready(tokens)
    start = time.perf_counter()
    for _ in range(steps):
        cache, tokens, _ = step(cache, tokens)  # tokens stay on device: no host sync in the loop
    jax.block_until_ready(tokens)
    return batch * steps / (time.perf_counter() - start)


def prefill_rate(w, cfg, batch: int, length: int, max_len: int) -> float:
    prompts = [list(np.random.default_rng(i).integers(3, cfg.vocab_size, length)) for i in range(batch)]
    cache = cache_lib.init_cache(cfg, batch, max_len)
    cache, buf = eng.prefill(w, cache, prompts, list(range(batch)), chunk=length)  # compile
    jax.block_until_ready(buf)
    start = time.perf_counter()
    cache, buf = eng.prefill(w, cache, prompts, list(range(batch)), buf, chunk=length)
    jax.block_until_ready(buf)
    return batch * length / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="tiny-moe")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prefill-len", type=int, default=128)
    ap.add_argument("--max-len", type=int, default=512)
    args = ap.parse_args()
    cfg = load_model(f"configs/model/{args.config}.yaml")
    t0 = time.perf_counter()
    model = random_model(cfg)
    w = eng.Weights.of(model)
    print(f"{args.config}: {cfg.num_hidden_layers} layers, width {cfg.hidden_size}, dtype {cfg.dtype}, "
          f"{jax.device_count()} x {jax.devices()[0].platform}; weights in {time.perf_counter() - t0:.1f}s")
    rows = [
        ("cache bytes / token (bf16, all layers)", f"{cache_lib.bytes_per_token(cfg):,}"),
        ("cache bytes / token / layer", f"{cache_lib.bytes_per_token(cfg) // cfg.num_hidden_layers:,}"),
        ("  vs per-head K+V (bf16, all layers)",
         f"{2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.num_hidden_layers:,}"
         if cfg.is_mla else "-"),
        (f"prefill tokens/s (8 x {args.prefill_len})", f"{prefill_rate(w, cfg, 8, args.prefill_len, args.max_len):,.0f}"),
        ("decode tokens/s, batch 1", f"{decode_rate(w, cfg, 1, args.steps, args.max_len):,.1f}"),
        ("decode tokens/s, batch 16", f"{decode_rate(w, cfg, 16, args.steps, args.max_len):,.1f}"),
    ]
    if cfg.num_nextn_predict_layers:
        prompt = [list(np.random.default_rng(0).integers(3, cfg.vocab_size, 16))]
        speculative_generate(model, prompt, 8, max_len=args.max_len)  # compile
        spec = speculative_generate(model, prompt, args.steps, max_len=args.max_len)
        rows += [("MTP speculative, batch 1: acceptance", f"{spec.acceptance_rate:.2f}"),
                 ("MTP speculative, batch 1: tokens/s", f"{spec.tokens_per_second:,.1f}")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v:>12}")


if __name__ == "__main__":
    main()
