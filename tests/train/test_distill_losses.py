"""Logit-level distillation losses against a NumPy reference written from the definitions over the
full vocabulary (float64), values and gradients (central finite differences of the reference)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.train.distill_losses import distill_loss, full_vocab_divergence, topk_divergence

B, T, V, K = 2, 3, 11, 4


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def kl(p, q):
    """Σ p log(p/q) with 0 log 0 = 0."""
    safe = np.where(p > 0, p, 1.0)
    return np.sum(np.where(p > 0, p * (np.log(safe) - np.log(np.where(p > 0, q, 1.0))), 0.0), -1)


def divergence(p, q, loss, beta):
    """P teacher, Q student (full-vocabulary arrays) -> per token."""
    if loss == "forward_kl" or (loss == "jsd" and beta == 0):
        return kl(p, q)
    if loss == "reverse_kl" or (loss == "jsd" and beta == 1):
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def reference(student, teacher, mask, loss, beta, tau, k):
    """The loss as a number: k=None full vocabulary; else P = the teacher's top-k of softmax(z/τ)
    renormalised (zero elsewhere), Q the student's full softmax (reverse KL: Q renormalised over the top-k)."""
    q = softmax(student / tau)
    p = softmax(teacher / tau)
    if k is not None:
        keep = np.zeros_like(p, bool)
        np.put_along_axis(keep, np.argsort(-teacher, -1)[..., :k], True, -1)
        p = np.where(keep, p, 0.0)
        p = p / p.sum(-1, keepdims=True)
        if loss == "reverse_kl" or (loss == "jsd" and beta == 1):
            q = np.where(keep, q, 0.0)
            q = q / q.sum(-1, keepdims=True)
    per_token = divergence(p, q, loss, beta)
    return np.sum(per_token * mask) / mask.sum()


def ours(student, teacher, mask, loss, beta, tau, k):
    if k is None:
        per_token = full_vocab_divergence(student, jnp.asarray(teacher, jnp.float32), loss, beta, tau)
    else:
        logp = jax.nn.log_softmax(jnp.asarray(teacher, jnp.float32), -1)  # stored at τ = 1
        logp_k, ids = jax.lax.top_k(logp, k)
        per_token = topk_divergence(student, ids, logp_k, loss, beta, tau)
    return distill_loss(per_token, jnp.asarray(mask))


CASES = [("forward_kl", 0.5), ("reverse_kl", 0.5)] + [("jsd", b) for b in (0.0, 0.1, 0.5, 0.9, 1.0)]


@pytest.mark.parametrize("loss,beta", CASES)
@pytest.mark.parametrize("tau,k", [(1.0, None), (2.0, None), (1.0, K), (0.7, K)])
def test_value_and_gradient_match_numpy(loss, beta, tau, k):
    rng = np.random.default_rng(hash((loss, beta, tau, k)) % 2**32)
    student = rng.normal(size=(B, T, V)) * 2
    teacher = rng.normal(size=(B, T, V)) * 2
    mask = (rng.random((B, T)) < 0.7).astype(np.float64)
    mask[0, 0] = 1.0
    want = reference(student, teacher, mask, loss, beta, tau, k)
    fn = lambda s: ours(s, teacher, mask, loss, beta, tau, k)  # noqa: E731
    got, grad = jax.value_and_grad(fn)(jnp.asarray(student, jnp.float32))
    np.testing.assert_allclose(float(got), want, rtol=2e-5, atol=2e-6)
    eps = 1e-6
    fd = np.zeros_like(student)
    for idx in itertools.product(*map(range, student.shape)):
        up, down = student.copy(), student.copy()
        up[idx] += eps
        down[idx] -= eps
        fd[idx] = (reference(up, teacher, mask, loss, beta, tau, k) - reference(down, teacher, mask, loss, beta, tau, k)) / (2 * eps)
    np.testing.assert_allclose(np.asarray(grad), fd, atol=3e-6, rtol=1e-3)
    assert np.abs(fd).max() > 1e-3  # a gradient there to compare


def test_topk_of_the_whole_vocabulary_is_the_full_loss():
    rng = np.random.default_rng(1)
    student, teacher = rng.normal(size=(B, T, V)), rng.normal(size=(B, T, V))
    mask = np.ones((B, T))
    for loss, beta in CASES:
        np.testing.assert_allclose(float(ours(student, teacher, mask, loss, beta, 1.5, V)),
                                   float(ours(student, teacher, mask, loss, beta, 1.5, None)), rtol=1e-5, atol=1e-6)


def test_zero_when_the_student_is_the_teacher_and_jsd_between_its_limits():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(B, T, V))
    mask = np.ones((B, T))
    for loss, beta in CASES:
        assert abs(float(ours(z, z, mask, loss, beta, 1.0, None))) < 1e-6
    student = rng.normal(size=(B, T, V))
    fwd, rev = (float(ours(student, z, mask, k, 0.5, 1.0, None)) for k in ("forward_kl", "reverse_kl"))
    for b in (0.1, 0.5, 0.9):  # KL convex in its 2nd argument: JSD_β <= β(1-β)(KL(P‖Q) + KL(Q‖P))
        assert 0 < float(ours(student, z, mask, "jsd", b, 1.0, None)) <= b * (1 - b) * (fwd + rev)
