"""Grouped-query attention of the dense R1-Distill students (Qwen2: q/k/v bias; Llama: none).

Letters: B batch, T length, D width, H query heads, G kv heads, K head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from r1jax.config import ModelConfig
from r1jax.model.layers import RotaryEmbedding, causal_attend, dtypes, normal, param, zeros
from r1jax.parallel.rules import constrain


class GQA(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.dtype, pdt = dtypes(cfg)
        init = normal(cfg.initializer_range)
        d, h, g, k = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads, cfg.gqa_head_dim
        self.wq = param(rngs, init, (d, h, k), ("embed", "heads", "head_dim"), pdt)
        self.wk = param(rngs, init, (d, g, k), ("embed", "kv_heads", "head_dim"), pdt)
        self.wv = param(rngs, init, (d, g, k), ("embed", "kv_heads", "head_dim"), pdt)
        self.wo = param(rngs, init, (h, k, d), ("heads", "head_dim", "embed"), pdt)
        self.use_qkv_bias = cfg.qkv_bias or cfg.attention_bias
        if self.use_qkv_bias:
            self.bq = param(rngs, zeros, (h, k), ("heads", "head_dim"), pdt)
            self.bk = param(rngs, zeros, (g, k), ("kv_heads", "head_dim"), pdt)
            self.bv = param(rngs, zeros, (g, k), ("kv_heads", "head_dim"), pdt)
        self.use_o_bias = cfg.attention_bias
        if self.use_o_bias:
            self.bo = param(rngs, zeros, (d,), ("embed",), pdt)
        self.rope = RotaryEmbedding(cfg, k, interleave=cfg.rope_interleave)
        self.scale = k**-0.5

    def project_kv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B,T,D] -> roped keys and values [B,T,G,K]: what decode caches."""
        dt = self.dtype
        k = jnp.einsum("BTD,DGK->BTGK", x, self.wk[...].astype(dt))
        v = jnp.einsum("BTD,DGK->BTGK", x, self.wv[...].astype(dt))
        if self.use_qkv_bias:
            k, v = k + self.bk[...].astype(dt), v + self.bv[...].astype(dt)
        return self.rope(k, positions), v

    def query(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        dt = self.dtype
        q = jnp.einsum("BTD,DHK->BTHK", x, self.wq[...].astype(dt))
        if self.use_qkv_bias:
            q = q + self.bq[...].astype(dt)
        return self.rope(constrain(q, ("batch", "length", "heads", "head_dim")), positions)

    def output(self, out: jax.Array) -> jax.Array:
        y = jnp.einsum("BTHK,HKD->BTD", out, self.wo[...].astype(self.dtype))
        return y + self.bo[...].astype(self.dtype) if self.use_o_bias else y

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        q = self.query(x, positions)
        k, v = self.project_kv(x, positions)
        groups = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)  # head h uses kv head h // groups
        return self.output(causal_attend(q, k, v, segment_ids, self.scale))
