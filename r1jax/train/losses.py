"""Language-model losses: next-token cross-entropy, the MTP loss, and the MoE balance loss.

A batch is a dict of [B, T] arrays: `inputs`, `targets` (the next token), `loss_mask` (1 where
the target counts), `segment_ids` (document of each token, 0 for padding), `positions`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from r1jax.model.decoder import ModelOutput


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits [..., V] (any float), targets [...] -> per-token CE [...] in f32."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return logz - picked


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    mask = mask.astype(jnp.float32)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def mtp_targets(batch: dict, depth: int) -> tuple[jax.Array, jax.Array]:
    """Targets and mask for MTP depth k (1-based): position i predicts targets[i + k], valid when
    that target counts and token i + k is in the same document as token i."""
    targets, mask, seg = batch["targets"], batch["loss_mask"], batch["segment_ids"]
    t = targets.shape[1]
    shifted = jnp.roll(targets, -depth, axis=1)
    valid = jnp.roll(mask, -depth, axis=1) * (jnp.roll(seg, -depth, axis=1) == seg)
    valid = valid * (jnp.arange(t) < t - depth)[None, :]
    return shifted, valid.astype(jnp.float32)


def lm_loss(out: ModelOutput, batch: dict, mtp_weight: float) -> tuple[jax.Array, dict]:
    """CE + mtp_weight / D · Σ_k CE_k + balance loss; returns (loss, metrics)."""
    ce = masked_mean(token_cross_entropy(out.logits, batch["targets"]), batch["loss_mask"])
    loss = ce + out.balance_loss
    metrics = {"ce": ce, "balance_loss": out.balance_loss}
    if out.mtp_logits is not None:
        depth = out.mtp_logits.shape[0]
        mtp = []
        for k in range(depth):
            targets, mask = mtp_targets(batch, k + 1)
            mtp.append(masked_mean(token_cross_entropy(out.mtp_logits[k], targets), mask))
        mtp_ce = sum(mtp) / depth
        loss = loss + mtp_weight * mtp_ce
        metrics["mtp_ce"] = mtp_ce
    metrics["loss"] = loss
    return loss, metrics
