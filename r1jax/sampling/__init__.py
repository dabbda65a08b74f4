"""Sampling from a `Decoder`: a static KV cache written in place by a few compiled steps, a
continuous-batching engine over it, and greedy speculative decoding with the MTP module.

    from r1jax.sampling import Engine, SamplingParams, generate

    completions = generate(model, prompts, SamplingParams(temperature=0.6, top_p=0.95), n=8)

Public API:
  requests: `Engine` (continuous batching, streaming `Event`s), `generate`, `SamplingParams`,
    `Completion`, `Event`, `BATCH_DECODE_CHUNK` (tokens a decode call for offline users);
  weights and placement: `Weights` (a decoder as the compiled steps take it, `unstacked` per-layer
    copies for CPU), `Placement` (mesh, rules, expert dispatch);
  the cache and the steps: `init_cache`, `Cache`, `prefill`, `decode_step`, `forward_cached`;
  tokens: `sample_tokens`, `argmax_first`;
  speculative decoding: `speculative_generate`, `SpeculativeResult`.

Modules: `engine` (requests), `steps` (compiled prefill / decode / sampling steps), `forward`
(the cached walk over the stacks; each layer's math is its own `cached` method in
`r1jax.model`), `tokens` (choosing tokens), `layout` (weights and placement), `cache` (storage),
`rng` (per-slot draws), `speculative` (MTP drafts).
"""

from r1jax.sampling.cache import Cache, init_cache
from r1jax.sampling.engine import BATCH_DECODE_CHUNK, Completion, Engine, Event, SamplingParams, generate
from r1jax.sampling.forward import forward_cached
from r1jax.sampling.layout import Placement, Weights
from r1jax.sampling.speculative import SpeculativeResult, speculative_generate
from r1jax.sampling.steps import decode_step, prefill
from r1jax.sampling.tokens import argmax_first, sample_tokens

__all__ = ["Cache", "Completion", "Engine", "Event", "Placement", "SamplingParams", "SpeculativeResult", "Weights",
           "argmax_first", "decode_step", "forward_cached", "generate", "init_cache", "prefill", "sample_tokens",
           "speculative_generate"]
