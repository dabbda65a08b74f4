"""Logit-level distillation losses: forward KL, reverse KL and generalised JSD between the
teacher's and the student's next-token distributions, per token.

Notation: P is the teacher's distribution, Q the student's, both at the softmax temperature τ
(`distill.kd_temperature`, applied to both logits: P = softmax(z_teacher / τ), Q = softmax(z_student / τ)).

    forward_kl   KL(P‖Q) = Σ_v P log(P / Q)        mean-seeking: Q covers all of P
    reverse_kl   KL(Q‖P) = Σ_v Q log(Q / P)        mode-seeking: Q sits on P's modes
    jsd          JSD_β = β KL(P‖M) + (1-β) KL(Q‖M),  M = β P + (1-β) Q

JSD_β is Agarwal et al. 2024 (GKD) and TRL's `GKDTrainer.generalized_jsd_loss` with β its `beta`:
β weighs the teacher. JSD_β vanishes at β = 0 and 1 (JSD_β ≈ β KL(P‖Q) as β -> 0 and
≈ (1-β) KL(Q‖P) as β -> 1), so, as TRL does, β = 0 *is* forward KL and β = 1 reverse KL (the
limits of JSD_β / β and JSD_β / (1-β)). No τ² factor (TRL has none; Hinton et al.'s τ² keeps
gradient sizes comparable across τ when mixed with a CE term: scale `ce_weight` instead).

Two sources of P:

* full vocabulary (`full_vocab_divergence`, the live teacher): both log-softmaxes over all V.
* stored top-k (`topk_divergence`): the teacher's top-k ids and log-probs (taken at τ = 1)
  per position. P is the top-k renormalised at τ (P_i ∝ exp(logp_i / τ) over the k ids, 0 off
  them: softmax(z / τ) restricted to the top-k and renormalised, whatever τ the log-probs were
  stored at, since the top-k set does not change with τ). Q stays the student's full-vocabulary
  distribution, its log-probs gathered at the k ids after a log-softmax over all V. Then
  - forward KL(P‖Q) = Σ_k P_k log(P_k / Q_k) is exact over the vocabulary (P = 0 off the top-k)
    and pushes the student's mass onto the teacher's top-k (the sparse KD of e.g. Arcee's
    DistillKit: a cross-entropy against the renormalised teacher, less its entropy);
  - JSD_β (0 < β < 1) is exact over the vocabulary too: off the top-k M = (1-β) Q, so the
    student's mass there, r = 1 - Σ_k Q_k, adds (1-β) r log(1 / (1-β)) to Σ_k of the terms;
  - reverse KL(Q‖P) is infinite whenever the student puts mass off the top-k, so it is taken
    between the two distributions renormalised over the top-k: KL(Q̃‖P), Q̃_k = Q_k / Σ_k Q_k.
    Its gradient does not move mass onto the top-k: mix in `ce_weight`, or use JSD / the live
    teacher. (jsd at β = 1 is this reverse KL.)
  Top-k is a biased estimate of the full-vocabulary divergence (Anshumann et al. 2025, "Sparse
  Logit Sampling"); k = 20 holds nearly all of a trained teacher's mass at τ = 1.

Every function returns per-token values [B, T]; `distill_loss` averages them over `loss_mask`.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]


def _kl(logp: jax.Array, logq: jax.Array) -> jax.Array:
    """Σ_last exp(logp) (logp - logq): KL(P‖Q) of log-probs over the last axis."""
    return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


def _jsd(logp: jax.Array, logq: jax.Array, beta: float) -> jax.Array:
    """β KL(P‖M) + (1-β) KL(Q‖M) over the last axis, M = β P + (1-β) Q, 0 < β < 1."""
    logm = jnp.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))
    return beta * _kl(logp, logm) + (1 - beta) * _kl(logq, logm)


def _kind(loss: Divergence, beta: float) -> str:
    if loss == "jsd":
        return "forward_kl" if beta == 0 else "reverse_kl" if beta == 1 else "jsd"
    if loss not in ("forward_kl", "reverse_kl"):
        raise ValueError(f"unknown divergence {loss!r}")
    return loss


def full_vocab_divergence(student_logits: jax.Array, teacher_logits: jax.Array, loss: Divergence = "forward_kl",
                          beta: float = 0.5, temperature: float = 1.0) -> jax.Array:
    """student_logits, teacher_logits [B, T, V] -> the divergence per token [B, T] (f32)."""
    logq = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    logp = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    kind = _kind(loss, beta)
    if kind == "forward_kl":
        return _kl(logp, logq)
    if kind == "reverse_kl":
        return _kl(logq, logp)
    return _jsd(logp, logq, beta)


def topk_divergence(student_logits: jax.Array, teacher_ids: jax.Array, teacher_logp: jax.Array,
                    loss: Divergence = "forward_kl", beta: float = 0.5, temperature: float = 1.0) -> jax.Array:
    """student_logits [B, T, V], the teacher's top-k ids [B, T, K] and log-probs [B, T, K] ->
    the divergence per token [B, T] (f32), as the module docstring defines it."""
    logq_full = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    logq = jnp.take_along_axis(logq_full, teacher_ids, axis=-1)  # [B, T, K]: Q at the teacher's ids
    logp = jax.nn.log_softmax(teacher_logp.astype(jnp.float32) / temperature, axis=-1)  # renormalised at τ
    kind = _kind(loss, beta)
    if kind == "forward_kl":
        return _kl(logp, logq)
    if kind == "reverse_kl":
        return _kl(jax.nn.log_softmax(logq, axis=-1), logp)
    rest = jnp.maximum(1.0 - jnp.sum(jnp.exp(logq), axis=-1), 0.0)  # the student's mass off the top-k
    return _jsd(logp, logq, beta) + (1 - beta) * rest * -math.log1p(-beta)


def distill_loss(per_token: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """The mean of per-token divergences over the trained (completion) tokens."""
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)
