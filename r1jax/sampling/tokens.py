"""Choosing tokens from logits: greedy (temperature 0), temperature, top-k, top-p.

Each slot draws one uniform from key = fold_in(fold_in(key(seed), sample_index), token_index)
(`r1jax.sampling.rng`, bit for bit `jax.random`), so a request's tokens depend on its seed and
its own logits only, never on what it is batched with. Log-probs are those of the distribution
actually sampled from (after temperature, top-k, top-p); for greedy requests, the model's own
log-prob of the argmax token (temperature 1, no truncation).

Three programs (`sampling_mode`, picked on the host from the rows' parameters): greedy (argmax
and its log-prob only: no draw, no softmax over scaled logits), sampled (temperature only: no
vocabulary ranking) and truncated (top-k / top-p). Each gives every row the tokens the
truncated program would: the choice only drops work no row needs, and no compiled step
branches on device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

GREEDY, SAMPLED, TRUNCATED = "greedy", "sampled", "truncated"


def sampling_mode(temperature, top_k, top_p) -> str:
    """The program a batch needs, from its rows' host arrays [B] (the rows that run only)."""
    temperature, top_k, top_p = np.asarray(temperature), np.asarray(top_k), np.asarray(top_p)
    sampled = temperature > 0
    if not sampled.any():
        return GREEDY
    return TRUNCATED if (sampled & ((top_k > 0) | (top_p < 1.0))).any() else SAMPLED


def sample_tokens(logits, temperature, top_k, top_p, uniforms, mode: str | None = None) -> tuple[jax.Array, jax.Array]:
    """logits [B,V] f32, per-row params and one uniform draw a row in [0, 1) (`slot_uniforms`;
    None for the greedy program) -> (tokens [B] int32, log-probs [B] f32). mode: the program
    (`sampling_mode`); None: chosen on device (`lax.cond`), for parameters known only there."""
    if mode == GREEDY:
        return greedy_tokens(logits)
    if mode is not None:
        return _sampled_tokens(logits, temperature, top_k, top_p, uniforms, truncate=mode == TRUNCATED)
    truncates = ((top_k > 0) | (top_p < 1.0)) & (temperature > 0)
    sampled = lambda lg, t, k, p, u: jax.lax.cond(
        jnp.any(truncates), lambda: _sampled_tokens(lg, t, k, p, u, truncate=True),
        lambda: _sampled_tokens(lg, t, k, p, u, truncate=False))
    return jax.lax.cond(jnp.all(temperature <= 0), lambda lg, t, k, p, u: greedy_tokens(lg), sampled,
                        logits, temperature, top_k, top_p, uniforms)


def argmax_first(x: jax.Array) -> jax.Array:
    """`jnp.argmax(x, -1)` as int32 (the first maximum; NaN rows give the last index) from two
    plain reductions: XLA:CPU's fused value-and-index reduce is several times slower."""
    return _argmax_given_max(x, jnp.max(x, -1, keepdims=True))


def _argmax_given_max(x, top):
    v = x.shape[-1]
    ids = jnp.arange(v, dtype=jnp.int32)
    return jnp.minimum(jnp.min(jnp.where(x == top, ids, v), -1), v - 1)


def greedy_tokens(logits) -> tuple[jax.Array, jax.Array]:
    """logits [B,V] -> (argmax_first [B], its log-softmax [B]). The argmax's log-prob is
    -log(sum(exp(logits - max))): `log_softmax` at that token, bit for bit (its shifted logit is
    exactly 0), from the max the argmax already took and one exp-sum pass, no [B,V] log-probs."""
    top = jnp.max(logits, -1, keepdims=True)
    return _argmax_given_max(logits, top), -jnp.log(jnp.sum(jnp.exp(logits - top), -1))


def _sampled_tokens(logits, temperature, top_k, top_p, uniforms, *, truncate: bool):
    """Each row draws from softmax(logits / T) restricted to its top-k / top-p set. The draw is
    over token ids whatever the truncation, so a row's token never depends on whether its batch
    needed the vocabulary ranking, which runs only when some row asks for top-k or top-p
    (`truncate`; a GRPO rollout at T 1 does not: the ranking would dominate its decode time)."""
    greedy = temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]
    masked = scaled
    if truncate:
        truncates = ((top_k > 0) | (top_p < 1.0)) & ~greedy
        masked = jnp.where(_truncation_mask(scaled, top_k, top_p) | ~truncates[:, None], scaled, -jnp.inf)
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
    stays). Tokens tied with the last one kept are kept too.

    No sort: two bisections over the logits' values, 32 halvings each of a masked count or sum
    over the row. The k-th largest value vk; the top-k set's mass is its tokens above vk plus
    k - #(above vk) copies of vk's (as ranking would count a tie at the k-th place); then the
    smallest value whose strictly-greater mass is below top_p: that token is the last one a
    ranking keeps, its ties too. Same sets as ranking, to float rounding of the masses (sums
    in id order, not in rank order). On XLA:CPU [16, 1,024]: 0.24 ms against 1.8 ms for the
    whole-row `top_k` the ranking took (most of a top-p decode step)."""
    v = scaled.shape[1]
    keys = _order_keys(scaled)
    lo, hi = jnp.min(keys, -1), jnp.max(keys, -1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kth = _bisect(lo, hi, lambda t: jnp.sum(keys >= t[:, None], -1) >= k, largest=True)
    above = keys > kth[:, None]
    top = jnp.max(scaled, -1, keepdims=True)
    e = jnp.exp(scaled - top)
    e_kth = jnp.max(jnp.where(keys == kth[:, None], e, 0.0), -1)
    tied_in = k - jnp.sum(above, -1)  # copies of the k-th value inside the top k
    probs = e / (jnp.sum(jnp.where(above, e, 0.0), -1) + tied_in * e_kth)[:, None]
    cut = _bisect(kth, hi, lambda t: jnp.sum(jnp.where(keys > t[:, None], probs, 0.0), -1) < top_p, largest=False)
    return keys >= jnp.where(top_p < 1.0, cut, kth)[:, None]


def _order_keys(x):
    """f32 [...] -> int32 [...] in the same order (-0.0 as +0.0, so ties stay ties)."""
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _bisect(lo, hi, pred, *, largest: bool):
    """[B] int32 bounds -> [B]: the largest t in [lo, hi] with pred(t) (pred(lo) holds; largest)
    or the smallest (pred(hi) holds), pred monotone; 32 halvings cover any int32 range."""

    def halve(_, bounds):
        lo, hi = bounds
        if largest:
            mid = (lo >> 1) + (hi >> 1) + ((lo | hi) & 1)  # ceil((lo + hi) / 2), no overflow
            ok = pred(mid)
            return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor
        ok = pred(mid)
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    return jax.lax.fori_loop(0, 32, halve, (lo, hi))[0]
