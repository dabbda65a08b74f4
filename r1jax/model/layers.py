"""Building blocks shared by every decoder: the parameter helper, RMSNorm, SwiGLU, RoPE, attention
(and the causal mask of the cached forms, `cache_mask`).

Letters: B batch, T query length, S key length, D model width, H heads, K head dim, F hidden.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from r1jax.config import ModelConfig
from r1jax.parallel.rules import constrain

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], axes: Sequence[str | None], dtype) -> nnx.Param:
    """Every parameter is made here, so the logical-axis metadata (`axes`) has one spelling."""
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), axes=tuple(axes))


def normal(std: float) -> Initializer:
    return jax.nn.initializers.normal(std)


zeros: Initializer = jax.nn.initializers.zeros
ones: Initializer = jax.nn.initializers.ones


def dtypes(cfg: ModelConfig) -> tuple[jnp.dtype, jnp.dtype]:
    """(compute dtype, parameter dtype)."""
    return jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)


class RMSNorm(nnx.Module):
    """y = w * x / rms(x), the normalisation computed in f32."""

    def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.weight = param(rngs, ones, (dim,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * y.astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU: down(silu(x @ gate) * (x @ up)). Weights [D, F], [D, F], [F, D]."""

    def __init__(self, cfg: ModelConfig, hidden: int, *, rngs: nnx.Rngs):
        self.dtype, pdt = dtypes(cfg)
        init = normal(cfg.initializer_range)
        d = cfg.hidden_size
        self.gate_proj = param(rngs, init, (d, hidden), ("embed", "mlp"), pdt)
        self.up_proj = param(rngs, init, (d, hidden), ("embed", "mlp"), pdt)
        self.down_proj = param(rngs, init, (hidden, d), ("mlp", "embed"), pdt)

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        gate = jnp.einsum("BTD,DF->BTF", x, self.gate_proj[...].astype(dt))
        up = jnp.einsum("BTD,DF->BTF", x, self.up_proj[...].astype(dt))
        h = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        return jnp.einsum("BTF,FD->BTD", h, self.down_proj[...].astype(dt))


# ----------------------------------------------------------------------------- RoPE


def yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(cfg: ModelConfig, dim: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies [dim/2] (f32) and the cos/sin amplitude (`attention_factor`).

    YaRN follows the spec: interpolated frequencies for slow dimensions, original ones for fast,
    a linear ramp between floor(dim(beta_fast)) and ceil(dim(beta_slow)).
    """
    base = cfg.rope_theta
    inv_freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq.astype(np.float32), 1.0
    if rs.type == "yarn":
        l0 = rs.original_max_position_embeddings

        def correction_dim(rotations: float) -> float:
            return dim * math.log(l0 / (2 * math.pi * rotations)) / (2 * math.log(base))

        low = max(math.floor(correction_dim(rs.beta_fast)), 0)
        high = min(math.ceil(correction_dim(rs.beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
        inv_freq = inv_freq / rs.factor * ramp + inv_freq * (1.0 - ramp)
        if rs.mscale and rs.mscale_all_dim:
            amplitude = yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim)
        else:  # the YaRN paper's default, as HF and DeepSeek's reference code do
            amplitude = yarn_mscale(rs.factor, 1.0)
        return inv_freq.astype(np.float32), amplitude
    # llama3: long wavelengths divided by factor, short kept, a smooth blend between.
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / rs.factor + smooth * inv_freq
    out = np.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    out = np.where((wavelen >= high_wavelen) & (wavelen <= low_wavelen), blended, out)
    return out.astype(np.float32), 1.0


def softmax_scale(cfg: ModelConfig, head_dim: int) -> float:
    """head_dim^-0.5, times mscale^2 under YaRN with mscale_all_dim (DeepSeek)."""
    scale = head_dim**-0.5
    rs = cfg.rope_scaling
    if rs is not None and rs.type == "yarn" and rs.mscale_all_dim:
        m = yarn_mscale(rs.factor, rs.mscale_all_dim)
        scale *= m * m
    return scale


class RotaryEmbedding:
    """Applies RoPE to [B, T, H, R] given positions [B, T]. Not a module: it holds no weights."""

    def __init__(self, cfg: ModelConfig, dim: int, interleave: bool):
        inv_freq, self.amplitude = rope_frequencies(cfg, dim)
        self.inv_freq = inv_freq
        self.interleave = interleave

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        angles = positions[..., None].astype(jnp.float32) * jnp.asarray(self.inv_freq)  # [B, T, R/2]
        cos = (jnp.cos(angles) * self.amplitude)[:, :, None, :]
        sin = (jnp.sin(angles) * self.amplitude)[:, :, None, :]
        xf = x.astype(jnp.float32)
        if self.interleave:  # pairs (2i, 2i+1) rotate together, as in DeepSeek's released weights
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
            out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
        else:  # halves (i, i + R/2) rotate together: Llama / Qwen
            half = x.shape[-1] // 2
            x1, x2 = xf[..., :half], xf[..., half:]
            out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        return out.astype(x.dtype)


# ----------------------------------------------------------------------------- attention


def causal_blocks(t: int) -> int:
    """Query blocks `causal_attend` splits a length-t sequence into: the largest divisor of t
    up to min(8, t // 32) (blocks of at least 32 queries; 1 below 64)."""
    return max(n for n in range(1, max(1, min(8, t // 32)) + 1) if t % n == 0)


def causal_attend(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, scale: float) -> jax.Array:
    """Self-attention, causal within segments: q [B,T,H,K], k [B,T,H,K], v [B,T,H,V],
    segment_ids [B,T] -> [B,T,H,V]. Query block i of n attends keys [0, (i+1)T/n) only, so the
    logits, softmax and their gradients cover (n+1)/2n of the T x T square (T 144, n 4: 62%)
    instead of computing the upper triangle and masking it away."""
    t = q.shape[1]
    n = causal_blocks(t)
    c = t // n
    outs = []
    for i in range(n):
        end = (i + 1) * c
        causal = (i * c + jnp.arange(c))[:, None] >= jnp.arange(end)[None, :]
        same = segment_ids[:, i * c: end, None] == segment_ids[:, None, :end]
        outs.append(attend(q[:, i * c: end], k[:, :end], v[:, :end], (causal[None] & same)[:, None], scale))
    return outs[0] if n == 1 else jnp.concatenate(outs, axis=1)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """Softmax attention. q [B,T,H,K], k [B,S,H,K], v [B,S,H,V], mask [B,1,T,S] -> [B,T,H,V].

    Logits and softmax in f32. A fully masked row (impossible with causal masks) gives zeros.
    """
    logits = jnp.einsum("BTHK,BSHK->BHTS", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("BHTS,BSHV->BTHV", probs, v)


def cache_mask(positions: jax.Array, s: int) -> jax.Array:
    """[B,T] query positions over a cache prefix of s entries -> [B,1,T,S]: entry s is visible
    iff s <= the query position (the cached forms' causal mask)."""
    return (jnp.arange(s)[None, None, :] <= positions[:, :, None])[:, None]
