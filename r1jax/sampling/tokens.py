"""Choosing tokens from logits: greedy (temperature 0), temperature, top-k, top-p.

Each slot draws one uniform from key = fold_in(fold_in(key(seed), sample_index), token_index)
(`r1jax.sampling.rng`, bit for bit `jax.random`), so a request's tokens depend on its seed and
its own logits only, never on what it is batched with. Log-probs are those of the distribution
actually sampled from (after temperature, top-k, top-p); for greedy requests, the model's own
log-prob of the argmax token (temperature 1, no truncation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_tokens(logits, temperature, top_k, top_p, uniforms) -> tuple[jax.Array, jax.Array]:
    """logits [B,V] f32, per-row params and one uniform draw a row in [0, 1) (`slot_uniforms`)
    -> (tokens [B] int32, log-probs [B] f32)."""
    # A batch of greedy rows needs no random draw (nor the sort of top-k / top-p).
    return jax.lax.cond(jnp.all(temperature <= 0), _greedy_tokens, _sampled_tokens,
                        logits, temperature, top_k, top_p, uniforms)


def argmax_first(x: jax.Array) -> jax.Array:
    """`jnp.argmax(x, -1)` as int32 (the first maximum; NaN rows give the last index) from two
    plain reductions: XLA:CPU's fused value-and-index reduce is several times slower."""
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
    rollout at T 1 does not: the sort would dominate its decode time)."""
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
    from one random number a row, where `jax.random.categorical` draws V Gumbels.
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
    # Descending values; `top_k` over the whole row, not `sort`: XLA:CPU's comparator sort of a
    # [B, V] row was most of a top-p decode step, its TopK kernel a fraction (same values).
    ranked = jax.lax.top_k(scaled, v)[0]
    in_k = jnp.arange(v)[None] < jnp.where(top_k > 0, top_k, v)[:, None]
    probs = jax.nn.softmax(jnp.where(in_k, ranked, -jnp.inf), axis=-1)
    in_p = (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]
    last = jnp.maximum(jnp.sum(in_k & in_p, axis=-1), 1) - 1
    return scaled >= jnp.take_along_axis(ranked, last[:, None], axis=1)
