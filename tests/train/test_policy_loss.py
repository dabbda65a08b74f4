"""GRPO loss against a NumPy transcription of the formulas (spec §7, TRL aggregations)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.train.policy_loss import LOSS_TYPES, grpo_loss, token_entropy, token_logprobs

B, T = 6, 9
EPS_LOW, EPS_HIGH, BETA = 0.2, 0.28, 0.04
MAX_LEN, GLOBAL_TOKENS = 12, 100.0


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    old = rng.normal(-2.0, 0.5, (B, T)).astype(np.float32)
    # Ratios spread over ~[0.5, 2]: both clip sides are hit.
    logp = (old + rng.uniform(-0.7, 0.7, (B, T))).astype(np.float32)
    ref = (old + rng.normal(0, 0.3, (B, T))).astype(np.float32)
    adv = np.array([1.0, -1.0, 0.5, -0.3, 2.0, -1.5], np.float32)
    lengths = np.array([9, 5, 1, 7, 3, 8])
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    return logp, old, ref, adv, mask


def _numpy_loss_and_grad(logp, old, ref, adv, mask, loss_type, beta):
    """Per-token loss and its analytic gradient wrt logp, aggregated as TRL does."""
    logp, old, ref, adv, mask = (np.float64(x) for x in (logp, old, ref, adv, mask))
    a = adv[:, None]
    r = np.exp(logp - old)
    unclipped, clipped = r * a, np.clip(r, 1 - EPS_LOW, 1 + EPS_HIGH) * a
    objective = np.minimum(unclipped, clipped)
    # d objective / d logp = r A where the unclipped term is the min, 0 where the clip binds.
    d_objective = np.where(unclipped <= clipped, r * a, 0.0)
    kl = np.exp(ref - logp) - (ref - logp) - 1
    d_kl = -np.exp(ref - logp) + 1
    tok = -(objective - beta * kl)
    d_tok = -(d_objective - beta * d_kl)
    if loss_type == "grpo":
        weights = mask / mask.sum(1, keepdims=True) / B
    elif loss_type == "bnpo":
        weights = mask / mask.sum()
    elif loss_type == "dr_grpo":
        weights = mask / (B * MAX_LEN)
    elif loss_type == "dapo":
        weights = mask / GLOBAL_TOKENS
    return (tok * weights).sum(), d_tok * weights


def _loss(loss_type, beta, logp, old, ref, adv, mask):
    return grpo_loss(
        logp, old, ref, adv, mask,
        loss_type=loss_type, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, beta=beta,
        max_completion_length=MAX_LEN, global_token_count=GLOBAL_TOKENS,
    )


@pytest.mark.parametrize("beta", [0.0, BETA])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_loss_and_gradient_match_numpy(loss_type, beta):
    logp, old, ref, adv, mask = _batch()
    fn = jax.jit(jax.value_and_grad(
        lambda lp: _loss(loss_type, beta, lp, old, ref, adv, mask), has_aux=True))
    (loss, metrics), grad = fn(jnp.asarray(logp))
    want_loss, want_grad = _numpy_loss_and_grad(logp, old, ref, adv, mask, loss_type, beta)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)
    assert ("kl" in metrics) == (beta != 0)


def test_both_clip_sides_and_metrics():
    logp, old, ref, adv, mask = _batch()
    r, a = np.exp(np.float64(logp) - old), adv[:, None]
    low = (r < 1 - EPS_LOW) & (a < 0)
    high = (r > 1 + EPS_HIGH) & (a > 0)
    assert (low * mask).sum() > 0 and (high * mask).sum() > 0  # the batch exercises both
    _, metrics = _loss("grpo", BETA, logp, old, ref, adv, mask)
    np.testing.assert_allclose(metrics["clip_ratio/low_mean"], (low * mask).sum() / mask.sum(), rtol=1e-6)
    np.testing.assert_allclose(metrics["clip_ratio/high_mean"], (high * mask).sum() / mask.sum(), rtol=1e-6)
    np.testing.assert_allclose(
        metrics["clip_ratio/region_mean"], ((low | high) * mask).sum() / mask.sum(), rtol=1e-6)
    kl = np.exp(np.float64(ref) - logp) - (np.float64(ref) - logp) - 1
    np.testing.assert_allclose(metrics["kl"], (kl * mask).sum() / mask.sum(), rtol=1e-5)


def test_dapo_without_global_count_is_local_token_mean():
    logp, old, ref, adv, mask = _batch()
    kw = dict(epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, beta=BETA)
    dapo, _ = grpo_loss(logp, old, ref, adv, mask, loss_type="dapo", **kw)
    bnpo, _ = grpo_loss(logp, old, ref, adv, mask, loss_type="bnpo", **kw)
    np.testing.assert_allclose(dapo, bnpo, rtol=1e-6)


def test_single_pass_ratio_is_one_and_only_its_gradient_survives():
    logp, _, _, adv, mask = _batch()
    def loss_fn(lp, old):
        return grpo_loss(lp, old, None, adv, mask, loss_type="bnpo", epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH)

    for old in (logp, None):  # an explicit copy, or None = stop_gradient(logp)
        (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(logp), old)
        weights = mask / mask.sum()
        np.testing.assert_allclose(loss, -(adv[:, None] * weights).sum(), rtol=1e-6)
        np.testing.assert_allclose(grad, -adv[:, None] * weights, rtol=1e-6)
        assert metrics["clip_ratio/region_mean"] == 0


def test_beta_zero_never_touches_ref():
    logp, old, ref, adv, mask = _batch()
    fn = functools.partial(
        grpo_loss, loss_type="grpo", epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, beta=0.0)
    jaxpr = jax.make_jaxpr(fn)(logp, old, ref, adv, mask).jaxpr
    ref_var = jaxpr.invars[2]
    used = [v for eqn in jaxpr.eqns for v in eqn.invars] + list(jaxpr.outvars)
    assert not any(v is ref_var for v in used)
    with_none, _ = jax.jit(fn)(logp, old, None, adv, mask)
    with_ref, _ = fn(logp, old, ref, adv, mask)
    want, _ = _numpy_loss_and_grad(logp, old, ref, adv, mask, "grpo", 0.0)
    np.testing.assert_allclose([with_none, with_ref], [want, want], rtol=1e-5)


def test_loss_types_are_registered_by_name():
    assert {"grpo", "bnpo", "dr_grpo", "dapo"} <= set(LOSS_TYPES)
    with pytest.raises(ValueError, match="unknown loss_type"):
        grpo_loss(*_batch(), loss_type="nope", epsilon_low=0.2, epsilon_high=0.2, beta=0.0)


def test_token_logprobs_and_entropy_match_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (2, 5, 11)).astype(np.float32)
    targets = rng.integers(0, 11, (2, 5))
    temperature = 0.6
    z = np.float64(logits) / temperature
    logprobs = z - np.log(np.exp(z).sum(-1, keepdims=True))
    want_lp = np.take_along_axis(logprobs, targets[..., None], -1)[..., 0]
    want_entropy = -(np.exp(logprobs) * logprobs).sum(-1)
    np.testing.assert_allclose(token_logprobs(logits, targets, temperature), want_lp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(token_entropy(logits, temperature), want_entropy, rtol=1e-5, atol=1e-5)
    assert token_logprobs(jnp.asarray(logits, jnp.bfloat16), targets, temperature).dtype == jnp.float32
