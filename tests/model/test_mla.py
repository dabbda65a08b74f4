"""Multi-head Latent Attention against an unfactored NumPy multi-head attention (spec §2),
plus causality and packed segments."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from r1jax.config import ModelConfig, RopeScaling
from r1jax.model.mla import MLA

D, H, N, R, V, L, Q = 32, 4, 8, 8, 6, 12, 10
EPS = 1e-6


def _cfg(q_lora: bool) -> ModelConfig:
    return ModelConfig(
        vocab_size=16, hidden_size=D, num_hidden_layers=1, num_attention_heads=H, intermediate_size=32,
        q_lora_rank=Q if q_lora else None, kv_lora_rank=L, qk_nope_head_dim=N, qk_rope_head_dim=R, v_head_dim=V,
        rope_theta=10000.0, rms_norm_eps=EPS,
        rope_scaling=RopeScaling(type="yarn", factor=4.0, original_max_position_embeddings=32, beta_fast=32,
                                 beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
    )


def _build(q_lora: bool, seed: int = 0):
    """An MLA with every weight (norm scales included) random; returns the module and its weights."""
    mla = nnx.eval_shape(lambda: MLA(_cfg(q_lora), rngs=nnx.Rngs(0)))  # no random init: every weight is set below
    rng = np.random.default_rng(seed)
    w = {}
    names = ["wkv_a", "wkv_b_k", "wkv_b_v", "wo"] + (["wq_a", "wq_b"] if q_lora else ["wq"])
    for name in names:
        shape = getattr(mla, name).value.shape
        w[name] = rng.normal(0, 1 / math.sqrt(shape[0]), shape)
        getattr(mla, name).value = jnp.asarray(w[name], jnp.float32)
    norms = [("kv_norm", L)] + ([("q_norm", Q)] if q_lora else [])
    for name, dim in norms:
        w[name] = rng.uniform(0.5, 1.5, (dim,))
        getattr(mla, name).weight.value = jnp.asarray(w[name], jnp.float32)
    assert all(isinstance(a, jax.Array) for a in jax.tree.leaves(nnx.state(mla)))
    return mla, {k: v.astype(np.float32).astype(np.float64) for k, v in w.items()}


_jit_forward = jax.jit(
    lambda graphdef, state, x, positions, segment_ids: nnx.merge(graphdef, state)(x, positions, segment_ids),
    static_argnums=0,
)


# ----------------------------------------------------------------------------- NumPy reference


def _rms(x, weight):
    return weight * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS)


def _yarn_inv_freq(dim, theta=10000.0, factor=4.0, l0=32, beta_fast=32, beta_slow=1):
    i = np.arange(dim // 2)
    inv = theta ** (-2.0 * i / dim)
    cd = lambda r: dim * np.log(l0 / (2 * np.pi * r)) / (2 * np.log(theta))  # noqa: E731
    low, high = max(math.floor(cd(beta_fast)), 0), min(math.ceil(cd(beta_slow)), dim - 1)
    ramp = np.clip((i - low) / (high - low), 0, 1)
    return inv / factor * ramp + inv * (1 - ramp)


def _rope_interleaved(x, positions):
    """x [T, ..., R]: pairs (2i, 2i+1) rotated by pos · inv_freq_i."""
    ang = positions.reshape((-1,) + (1,) * (x.ndim - 2) + (1,)) * _yarn_inv_freq(x.shape[-1])
    out = np.empty_like(x)
    a, b = x[..., 0::2], x[..., 1::2]
    out[..., 0::2] = a * np.cos(ang) - b * np.sin(ang)
    out[..., 1::2] = a * np.sin(ang) + b * np.cos(ang)
    return out


def np_mla(x, positions, segment_ids, w):
    """One sequence x [T, D]: plain per-head attention with explicitly built q, k, v."""
    t = x.shape[0]
    if "wq" in w:
        q = np.einsum("TD,DHK->THK", x, w["wq"])
    else:
        q = np.einsum("TQ,QHK->THK", _rms(x @ w["wq_a"], w["q_norm"]), w["wq_b"])
    q = np.concatenate([q[..., :N], _rope_interleaved(q[..., N:], positions)], -1)  # [T, H, N+R]
    ckv = x @ w["wkv_a"]
    c = _rms(ckv[:, :L], w["kv_norm"])
    k_rope = _rope_interleaved(ckv[:, L:], positions)  # ONE head [T, R]
    k_nope = np.einsum("TL,LHN->THN", c, w["wkv_b_k"])
    k = np.concatenate([k_nope, np.broadcast_to(k_rope[:, None, :], (t, H, R))], -1)
    v = np.einsum("TL,LHV->THV", c, w["wkv_b_v"])
    mscale = 0.1 * 1.0 * math.log(4.0) + 1
    scale = (N + R) ** -0.5 * mscale**2
    out = np.zeros((t, H, V))
    for h in range(H):
        for i in range(t):
            allowed = [j for j in range(i + 1) if segment_ids[j] == segment_ids[i]]
            logits = np.array([q[i, h] @ k[j, h] for j in allowed]) * scale
            p = np.exp(logits - logits.max())
            p /= p.sum()
            out[i, h] = sum(pj * v[j, h] for pj, j in zip(p, allowed))
    return np.einsum("THV,HVD->TD", out, w["wo"])


def _call(mla, x, positions=None, segment_ids=None):
    b, t, _ = x.shape
    if positions is None:
        positions = np.broadcast_to(np.arange(t), (b, t))
    if segment_ids is None:
        segment_ids = np.ones((b, t))
    graphdef, state = nnx.split(mla)
    return _jit_forward(graphdef, state, jnp.asarray(x, jnp.float32), jnp.asarray(positions, jnp.int32),
                        jnp.asarray(segment_ids, jnp.int32))


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("q_lora", [True, False], ids=["q_lora", "plain_q"])
def test_matches_unfactored_attention(q_lora):
    mla, w = _build(q_lora)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 6, D)).astype(np.float32)
    positions = np.array([np.arange(6), np.arange(6) + 40])  # row 2: past the original length
    got = _call(mla, x, positions)
    chex.assert_shape(got, (2, 6, D))
    want = np.stack([np_mla(x[b].astype(np.float64), positions[b], np.ones(6), w) for b in range(2)])
    chex.assert_trees_all_close(got, want.astype(np.float32), atol=1e-5, rtol=1e-5)


def test_packed_segments_in_reference_matter():
    """The packed test below would be vacuous if segments changed nothing: they do."""
    _, w = _build(True)
    x = np.random.default_rng(2).normal(size=(6, D))
    same = np_mla(x, np.arange(6), np.ones(6), w)
    packed = np_mla(x, np.array([0, 1, 2, 0, 1, 2]), np.array([1, 1, 1, 2, 2, 2]), w)
    assert not np.allclose(same[3:], packed[3:], atol=1e-3)


def test_causal():
    mla, _ = _build(True)
    x = np.random.default_rng(3).normal(size=(1, 6, D)).astype(np.float32)
    base = np.asarray(_call(mla, x))
    for t in (0, 3, 5):
        x2 = x.copy()
        x2[:, t] += np.random.default_rng(t).normal(size=D).astype(np.float32)
        out = np.asarray(_call(mla, x2))
        np.testing.assert_array_equal(out[:, :t], base[:, :t])
        assert (np.abs(out[:, t:] - base[:, t:]).max(-1) > 1e-4).all()


def test_packed_segments_match_separate_runs():
    mla, w = _build(True)
    x = np.random.default_rng(4).normal(size=(1, 6, D)).astype(np.float32)
    seg = np.array([[1, 1, 1, 2, 2, 2]])
    pos = np.array([[0, 1, 2, 0, 1, 2]])
    packed = np.asarray(_call(mla, x, pos, seg))
    alone_2 = np.asarray(_call(mla, x[:, 3:]))
    alone_1 = np.asarray(_call(mla, x[:, :3]))
    chex.assert_trees_all_close(packed[:, 3:], alone_2, atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(packed[:, :3], alone_1, atol=1e-6, rtol=1e-6)
    want = np_mla(x[0].astype(np.float64), pos[0], seg[0], w)
    chex.assert_trees_all_close(packed[0], want.astype(np.float32), atol=1e-5, rtol=1e-5)
    # Segment 1 ignores segment 2's tokens, and segment 2 ignores segment 1's.
    x2 = x.copy()
    x2[:, 3:] += 1.0
    np.testing.assert_array_equal(np.asarray(_call(mla, x2, pos, seg))[:, :3], packed[:, :3])
    x3 = x.copy()
    x3[:, :3] += 1.0
    chex.assert_trees_all_close(np.asarray(_call(mla, x3, pos, seg))[:, 3:], packed[:, 3:], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("t", [40, 100, 144])
def test_causal_attend_equals_numpy_masked_softmax(t):
    """Block-causal attention (query block i attends keys up to its end) against the full T x T
    masked softmax in NumPy, with two packed segments; 40 / 100 / 144 run 1 / 2 / 4 blocks."""
    from r1jax.model.layers import causal_attend, causal_blocks  # noqa: PLC0415

    rng = np.random.default_rng(t)
    b, h, kd, vd = 2, 3, 5, 4
    q, k = rng.standard_normal((2, b, t, h, kd)).astype(np.float32)
    v = rng.standard_normal((b, t, h, vd)).astype(np.float32)
    seg = np.ones((b, t), np.int32)
    seg[1, t // 3:] = 2
    got = jax.jit(causal_attend, static_argnums=4)(q, k, v, seg, 0.3)
    logits = np.einsum("bthk,bshk->bhts", q, k) * 0.3
    mask = np.tril(np.ones((t, t), bool))[None] & (seg[:, :, None] == seg[:, None, :])
    logits = np.where(mask[:, None], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    want = np.einsum("bhts,bshv->bthv", p / p.sum(-1, keepdims=True), v)
    assert causal_blocks(t) == {40: 1, 100: 2, 144: 4}[t]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
