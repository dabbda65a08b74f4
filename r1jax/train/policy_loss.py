"""GRPO policy loss (DeepSeekMath / R1) and its common variants, as pure JAX functions.

Shapes: B completions, T completion tokens, V vocab. Every `[B, T]` array is per completion
token; `mask` is 1 on real completion tokens and 0 on padding (and on whatever the caller
wants excluded, e.g. truncated outputs).

Per token, with r = exp(logp - old_logp):
    objective = min(r A, clip(r, 1 - epsilon_low, 1 + epsilon_high) A)
    kl        = exp(ref_logp - logp) - (ref_logp - logp) - 1          (k3 estimator)
    loss      = -(objective - beta * kl)
and `loss_type` picks how token losses become one scalar. Option names and aggregations
follow TRL's GRPOTrainer (`loss_type`, `epsilon`/`epsilon_high`, `beta`,
`max_completion_length`) so configs carry over. New aggregations are added with
`register_loss_type`, as Tunix registers its losses by name.

Gradient accumulation: `grpo`, `bnpo` and `dr_grpo` return a per-micro-batch mean, so average
them over accumulation steps; `dapo` already divides by the token count of the whole global
batch, so sum it over accumulation steps (and over devices if it is computed per device).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

# (token_loss [B,T], mask [B,T], max_completion_length, global_token_count) -> scalar
LossAggregator = Callable[[jax.Array, jax.Array, int | None, jax.Array | None], jax.Array]

LOSS_TYPES: dict[str, LossAggregator] = {}


def register_loss_type(name: str) -> Callable[[LossAggregator], LossAggregator]:
    """Decorator adding a token-loss aggregation to `LOSS_TYPES` under `name`."""

    def register(aggregate: LossAggregator) -> LossAggregator:
        LOSS_TYPES[name] = aggregate
        return aggregate

    return register


@register_loss_type("grpo")
def _sequence_mean(token_loss, mask, max_completion_length, global_token_count):
    """Mean over each sequence's tokens, then mean over sequences (the paper's 1/G Σ 1/|o|)."""
    per_sequence = (token_loss * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)
    return per_sequence.mean()


@register_loss_type("bnpo")
def _local_token_mean(token_loss, mask, max_completion_length, global_token_count):
    """Mean over all unmasked tokens of this (local) batch."""
    return (token_loss * mask).sum() / jnp.maximum(mask.sum(), 1.0)


@register_loss_type("dr_grpo")
def _constant_normaliser(token_loss, mask, max_completion_length, global_token_count):
    """Sum / (B * max_completion_length): no length bias (Dr. GRPO).

    `max_completion_length` defaults to T, which is right when completions are padded to it.
    """
    max_len = token_loss.shape[1] if max_completion_length is None else max_completion_length
    return (token_loss * mask).sum() / (token_loss.shape[0] * max_len)


@register_loss_type("dapo")
def _global_token_mean(token_loss, mask, max_completion_length, global_token_count):
    """Sum / completion tokens of the whole global generation batch (DAPO token-level mean).

    Falls back to the local token count (= `bnpo`) when `global_token_count` is None.
    """
    count = mask.sum() if global_token_count is None else global_token_count
    return (token_loss * mask).sum() / jnp.maximum(jnp.asarray(count, jnp.float32), 1.0)


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def grpo_loss(
    logp: jax.Array,
    old_logp: jax.Array | None,
    ref_logp: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    loss_type: str = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    max_completion_length: int | None = None,
    global_token_count: jax.Array | int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped-surrogate GRPO loss with an optional k3 KL penalty.

    Args:
      logp: [B, T] log-probs of the completion tokens under the policy being trained.
      old_logp: [B, T] log-probs under the sampling policy; None means one optimisation pass
        per rollout (μ = 1), where old = stop_gradient(logp) and r is exactly 1.
      ref_logp: [B, T] log-probs under the reference policy; unused (may be None) if beta == 0.
      advantages: [B] one advantage per completion, shared by all its tokens.
      mask: [B, T] 1 on completion tokens that count, 0 elsewhere.
      loss_type: a key of `LOSS_TYPES` ("grpo", "bnpo", "dr_grpo", "dapo").
      epsilon_low, epsilon_high: clip range [1 - epsilon_low, 1 + epsilon_high].
      beta: KL coefficient; a Python float (static), so beta == 0 drops the KL term entirely.
      max_completion_length: normaliser of "dr_grpo" (defaults to T).
      global_token_count: normaliser of "dapo": completion tokens of the whole global batch,
        over all devices and accumulation steps (defaults to the local count).

    Returns:
      (loss scalar, metrics) with token-weighted metrics "clip_ratio/low_mean",
      "clip_ratio/high_mean", "clip_ratio/region_mean" and, if beta != 0, "kl".
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; registered: {sorted(LOSS_TYPES)}")
    logp = logp.astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    old_logp = jax.lax.stop_gradient(logp) if old_logp is None else old_logp.astype(jnp.float32)
    adv = advantages.astype(jnp.float32)[:, None]

    ratio = jnp.exp(logp - old_logp)
    clipped_ratio = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    objective = jnp.minimum(ratio * adv, clipped_ratio * adv)
    token_loss = -objective

    metrics = {}
    if beta != 0.0:
        log_ref_over_policy = ref_logp.astype(jnp.float32) - logp
        kl = jnp.exp(log_ref_over_policy) - log_ref_over_policy - 1.0
        token_loss = token_loss + beta * kl
        metrics["kl"] = _masked_mean(kl, mask)

    loss = LOSS_TYPES[loss_type](token_loss, mask, max_completion_length, global_token_count)

    low_clipped = (ratio < 1.0 - epsilon_low) & (adv < 0)
    high_clipped = (ratio > 1.0 + epsilon_high) & (adv > 0)
    metrics["clip_ratio/low_mean"] = _masked_mean(low_clipped, mask)
    metrics["clip_ratio/high_mean"] = _masked_mean(high_clipped, mask)
    metrics["clip_ratio/region_mean"] = _masked_mean(low_clipped | high_clipped, mask)
    return loss, metrics


def token_logprobs(logits: jax.Array, targets: jax.Array, temperature: float = 1.0) -> jax.Array:
    """[B, T, V] logits, [B, T] int targets -> [B, T] f32 log softmax(logits / temperature)[target].

    Logits must be divided by the sampling temperature so that the ratio compares the same
    distribution the sampler drew from.
    """
    scaled = logits.astype(jnp.float32) / temperature
    target_logit = jnp.take_along_axis(scaled, targets[..., None], axis=-1)[..., 0]
    return target_logit - jax.nn.logsumexp(scaled, axis=-1)


def token_entropy(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """[B, T, V] logits -> [B, T] f32 entropy of softmax(logits / temperature), in nats."""
    scaled = logits.astype(jnp.float32) / temperature
    log_norm = jax.nn.logsumexp(scaled, axis=-1)
    probs = jnp.exp(scaled - log_norm[..., None])
    return log_norm - (probs * scaled).sum(-1)
