"""RoPE frequencies (YaRN, Llama-3.1), the MLA softmax scale, and the rotation itself, against
NumPy transcriptions of spec §2 and the published Llama-3.1 `apply_scaling`."""

import math

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.config import ModelConfig, RopeScaling, load_model
from r1jax.model.layers import RotaryEmbedding, rope_frequencies, softmax_scale


def spec_yarn_inv_freq(dim, theta, factor, l0, beta_fast, beta_slow):
    """Spec §2, written out in float64."""
    i = np.arange(dim // 2, dtype=np.float64)
    inv_freq = theta ** (-2.0 * i / dim)

    def correction_dim(r):
        return dim * np.log(l0 / (2 * np.pi * r)) / (2 * np.log(theta))

    low = min(max(math.floor(correction_dim(beta_fast)), 0), dim - 1)
    high = min(max(math.ceil(correction_dim(beta_slow)), 0), dim - 1)
    ramp = np.clip((i - low) / (high - low), 0.0, 1.0)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp)


def llama31_apply_scaling(freqs, factor, low_freq_factor, high_freq_factor, old_context_len):
    """Meta's Llama-3.1 reference (`apply_scaling` in llama/model.py), element by element."""
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            out.append(freq)
        elif wavelen > low_freq_wavelen:
            out.append(freq / factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return np.array(out)


def _mini(**kw) -> ModelConfig:
    base = dict(vocab_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("name", ["deepseek-v3-671b", "deepseek-v2-lite", "tiny-moe"])
def test_yarn_inv_freq_matches_spec(name):
    cfg = load_model(f"configs/model/{name}.yaml")
    rs = cfg.rope_scaling
    dim = cfg.qk_rope_head_dim
    got, amplitude = rope_frequencies(cfg, dim)
    want = spec_yarn_inv_freq(dim, cfg.rope_theta, rs.factor, rs.original_max_position_embeddings,
                              rs.beta_fast, rs.beta_slow)
    chex.assert_shape(got, (dim // 2,))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # Both ends are really exercised: fast dims keep θ^(-2i/D), slow ones are divided by s.
    plain = cfg.rope_theta ** (-np.arange(0, dim, 2) / dim)
    assert np.isclose(got[0], plain[0], rtol=1e-6) and np.isclose(got[-1], plain[-1] / rs.factor, rtol=1e-6)
    # mscale == mscale_all_dim in these configs, so cos/sin keep unit amplitude.
    assert amplitude == pytest.approx(1.0)


def test_yarn_v3_ramp_bounds():
    """Hand-checked numbers for V3 (D=64, L0=4096, θ=1e4): dim(32)=10.47 -> 10, dim(1)=22.5 -> 23."""
    cfg = load_model("configs/model/deepseek-v3-671b.yaml")
    got, _ = rope_frequencies(cfg, 64)
    plain = 10000.0 ** (-np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(got[:11], plain[:11], rtol=1e-6)  # i <= low = 10: original
    np.testing.assert_allclose(got[23:], plain[23:] / 40, rtol=1e-6)  # i >= high = 23: interpolated
    mid = got[11:23] / plain[11:23]
    assert ((mid < 1) & (mid > 1 / 40)).all() and (np.diff(mid) < 0).all()


def test_small_yarn_with_clamped_bounds():
    """A short original context pushes dim(beta_fast) below 0: low clamps to 0."""
    rs = RopeScaling(type="yarn", factor=8.0, original_max_position_embeddings=64, beta_fast=32, beta_slow=1,
                     mscale=1.0, mscale_all_dim=1.0)
    cfg = _mini(rope_scaling=rs, rope_theta=500.0, qk_rope_head_dim=16)
    got, _ = rope_frequencies(cfg, 16)
    np.testing.assert_allclose(got, spec_yarn_inv_freq(16, 500.0, 8.0, 64, 32, 1), rtol=1e-6)


def test_no_scaling_is_plain_rope():
    cfg = _mini(rope_theta=10000.0)
    got, amplitude = rope_frequencies(cfg, 8)
    np.testing.assert_allclose(got, 10000.0 ** (-np.arange(4) * 2 / 8), rtol=1e-6)
    assert amplitude == 1.0


def test_yarn_amplitude_when_mscales_differ():
    """HF DeepSeek multiplies cos/sin by get_mscale(s, mscale) / get_mscale(s, mscale_all_dim)."""
    rs = RopeScaling(type="yarn", factor=40.0, mscale=1.0, mscale_all_dim=0.5)
    _, amplitude = rope_frequencies(_mini(rope_scaling=rs), 8)
    assert amplitude == pytest.approx((0.1 * math.log(40) + 1) / (0.05 * math.log(40) + 1))


def test_softmax_scale_with_yarn_mscale():
    v3 = load_model("configs/model/deepseek-v3-671b.yaml")
    m = 0.1 * 1.0 * math.log(40) + 1
    assert softmax_scale(v3, 192) == pytest.approx(192**-0.5 * m * m, rel=1e-12)
    v2 = load_model("configs/model/deepseek-v2-lite.yaml")
    m = 0.1 * 0.707 * math.log(40) + 1
    assert softmax_scale(v2, 192) == pytest.approx(192**-0.5 * m * m, rel=1e-12)
    assert softmax_scale(_mini(), 16) == pytest.approx(0.25)
    no_all_dim = _mini(rope_scaling=RopeScaling(type="yarn", factor=40.0, mscale=1.0, mscale_all_dim=0.0))
    assert softmax_scale(no_all_dim, 16) == pytest.approx(0.25)


def test_llama3_scaling_matches_llama31():
    cfg = load_model("configs/model/r1-distill-llama-8b.yaml")
    rs = cfg.rope_scaling
    dim = cfg.gqa_head_dim
    got, amplitude = rope_frequencies(cfg, dim)
    base = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2)[: dim // 2] / dim))
    want = llama31_apply_scaling(base, rs.factor, rs.low_freq_factor, rs.high_freq_factor,
                                 rs.original_max_position_embeddings)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert amplitude == 1.0
    # All three regimes occur at head dim 128.
    ratio = got / base
    assert np.isclose(ratio, 1).any() and np.isclose(ratio, 1 / rs.factor).any()
    assert ((ratio < 0.999) & (ratio > 1 / rs.factor + 1e-3)).any()


# ----------------------------------------------------------------------------- the rotation


def np_rope(x, positions, inv_freq, interleave):
    """x [B,T,H,R], positions [B,T]: pairs (2i, 2i+1) or halves (i, i+R/2) rotate by pos·inv_freq_i."""
    ang = positions[..., None, None].astype(np.float64) * inv_freq  # [B,T,1,R/2]
    cos, sin = np.cos(ang), np.sin(ang)
    out = np.empty_like(x, dtype=np.float64)
    if interleave:
        a, b = x[..., 0::2], x[..., 1::2]
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
    else:
        h = x.shape[-1] // 2
        a, b = x[..., :h], x[..., h:]
        out[..., :h], out[..., h:] = a * cos - b * sin, a * sin + b * cos
    return out


@pytest.mark.parametrize("interleave", [True, False])
def test_rotary_embedding_matches_numpy(interleave):
    cfg = load_model("configs/model/tiny-moe.yaml")
    r = cfg.qk_rope_head_dim
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, r)).astype(np.float32)
    pos = np.array([[0, 1, 2, 3, 4], [7, 100, 300, 0, 1023]], np.int32)
    got = RotaryEmbedding(cfg, r, interleave=interleave)(jnp.asarray(x), jnp.asarray(pos))
    want = np_rope(x, pos, spec_yarn_inv_freq(r, 10000.0, 4.0, 256, 32, 1), interleave)
    chex.assert_trees_all_close(got, want.astype(np.float32), atol=2e-5, rtol=1e-5)


def test_interleaved_equals_hf_permuted_half_rotation():
    """HF permutes pairs (2i, 2i+1) to halves then rotates halves: same numbers, permuted back."""
    cfg = load_model("configs/model/tiny-moe.yaml")
    r = cfg.qk_rope_head_dim
    x = np.random.default_rng(1).normal(size=(1, 6, 2, r)).astype(np.float32)
    pos = jnp.arange(6)[None] * 37
    perm = np.concatenate([np.arange(0, r, 2), np.arange(1, r, 2)])
    inter = RotaryEmbedding(cfg, r, interleave=True)(jnp.asarray(x), pos)
    halves = RotaryEmbedding(cfg, r, interleave=False)(jnp.asarray(x[..., perm]), pos)
    chex.assert_trees_all_close(np.asarray(inter)[..., perm], halves, atol=1e-6)
