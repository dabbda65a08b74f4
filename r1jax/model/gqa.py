"""Grouped-query attention of the dense R1-Distill students (Qwen2: q/k/v bias; Llama: none): the
training form (`GQA.__call__`) and the cached form the sampler runs (`GQA.cached`, roped K and V
cached per kv head).

Letters: B batch, T length, D width, H query heads, G kv heads, K head dim.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from r1jax.config import ModelConfig
from r1jax.model.attention_kernels import attention_fn
from r1jax.model.layers import RotaryEmbedding, cache_mask, dtypes, normal, param, zeros
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
        self.attention_impl = cfg.attention_impl

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
        return self.output(attention_fn(self.attention_impl)(q, k, v, segment_ids, self.scale))

    # ------------------------------------------------------------------ cached form

    def decode_layout(self) -> dict:
        """No rearranged weights for the decode (MLA's `decode_layout` counterpart)."""
        return {}

    def cached(self, x: jax.Array, positions: jax.Array, cache_io: Callable, *, absorbed: bool = True,
               layout: dict | None = None) -> tuple[jax.Array, Any]:
        """x [B,T,D] at positions [B,T] over this layer's cache -> (out [B,T,D], the updated cache
        arrays cache_io returned). cache_io: new entries {"k", "v": [B,T,G,K]} -> (the cache
        prefix {name: [B,S,G,K]} with them written, the updated arrays). Entry s is visible to a
        query at position p iff s <= p. absorbed, layout: MLA's options, unused here."""
        seen, written = cache_io(dict(zip(("k", "v"), self.project_kv(x, positions))))
        mask = cache_mask(positions, seen["k"].shape[1])
        return self.cached_attention(self.query(x, positions), seen["k"], seen["v"], mask), written

    def cached_attention(self, q, k, v, mask) -> jax.Array:
        """q [B,T,H,K], cached k, v [B,S,G,K], mask [B,1,T,S] -> [B,T,D]; query head h reads kv
        head h // J (J query heads per kv head), no repeated K/V."""
        b, t, h, kd = q.shape
        g = k.shape[2]
        qg = q.reshape(b, t, g, h // g, kd)
        logits = jnp.einsum("BTGJK,BSGK->BGJTS", qg, k, preferred_element_type=jnp.float32) * self.scale
        logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("BGJTS,BSGK->BTGJK", probs, v).reshape(b, t, h, kd)
        return self.output(out)
