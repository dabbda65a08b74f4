"""Multi-head Latent Attention (DeepSeek-V2/V3): the training form (`MLA.__call__`) and the
cached form the sampler runs (`MLA.cached`: prefill chunks, decode steps, verification).

Letters: B batch, T length, D model width, H heads, Q q_lora rank, L kv_lora rank,
N nope head dim (qk_nope_head_dim), R rope head dim, V value head dim.

    q        = W_qb · RMSNorm(W_qa · x)           (or W_q · x without q LoRA)   [B,T,H,N+R]
    [c ; kr] = W_kva · x                          c: latent [B,T,L], kr: ONE shared rope key [B,T,R]
    k_nope   = W_kb · RMSNorm(c),  v = W_vb · RMSNorm(c)                             [B,T,H,N], [B,T,H,V]
    k        = [k_nope ; rope(kr)] per head,  q = [q_nope ; rope(q_rope)]

The W_kvb of the released weights is stored here split in its key half `wkv_b_k` [L,H,N] and
value half `wkv_b_v` [L,H,V], the two sides the absorbed decode folds into q and o.

Cached (spec §2): each layer caches the normed latent c [L] and the roped shared key kr [R] per
token. Decode is "absorbed": W_kvb's key half folds into the query (q_lat = q_nope · W_kb,
[B,T,H,L]), the scores are q_lat · c + q_rope · kr over the cached latent, and the output stays
in latent space (probs · c) until W_kvb's value half and `wo` map it out; nothing per head is
rebuilt from the cache. Prefill (many query tokens) uses the training form, K/V rebuilt from the
latent (`rebuilt_attention`), which costs fewer FLOPs there.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from r1jax.config import ModelConfig
from r1jax.model.attention_kernels import attention_fn
from r1jax.model.layers import (RMSNorm, RotaryEmbedding, attend, cache_mask, dtypes, normal, param,
                                softmax_scale)
from r1jax.parallel.rules import constrain


class MLA(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.dtype, pdt = dtypes(cfg)
        init = normal(cfg.initializer_range)
        d, h = cfg.hidden_size, cfg.num_attention_heads
        n, r, v, lat = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        self.nope_dim, self.rope_dim, self.kv_lora_rank = n, r, lat
        if cfg.q_lora_rank is None:
            self.wq = param(rngs, init, (d, h, n + r), ("embed", "heads", "head_dim"), pdt)
        else:
            self.wq_a = param(rngs, init, (d, cfg.q_lora_rank), ("embed", "q_lora"), pdt)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, param_dtype=pdt, rngs=rngs)
            self.wq_b = param(rngs, init, (cfg.q_lora_rank, h, n + r), ("q_lora", "heads", "head_dim"), pdt)
        self.wkv_a = param(rngs, init, (d, lat + r), ("embed", "kv_lora"), pdt)
        self.kv_norm = RMSNorm(lat, cfg.rms_norm_eps, param_dtype=pdt, rngs=rngs)
        self.wkv_b_k = param(rngs, init, (lat, h, n), ("kv_lora", "heads", "head_dim"), pdt)
        self.wkv_b_v = param(rngs, init, (lat, h, v), ("kv_lora", "heads", "head_dim"), pdt)
        self.wo = param(rngs, init, (h, v, d), ("heads", "head_dim", "embed"), pdt)
        self.rope = RotaryEmbedding(cfg, r, interleave=cfg.rope_interleave)
        self.scale = softmax_scale(cfg, n + r)
        self.attention_impl = cfg.attention_impl

    def queries(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B,T,D] -> (q_nope [B,T,H,N], q_rope [B,T,H,R] with RoPE applied)."""
        dt = self.dtype
        if hasattr(self, "wq"):
            q = jnp.einsum("BTD,DHK->BTHK", x, self.wq[...].astype(dt))
        else:
            cq = self.q_norm(jnp.einsum("BTD,DQ->BTQ", x, self.wq_a[...].astype(dt)))
            q = jnp.einsum("BTQ,QHK->BTHK", cq, self.wq_b[...].astype(dt))
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        q_nope, q_rope = q[..., : self.nope_dim], q[..., self.nope_dim :]
        return q_nope, self.rope(q_rope, positions)

    def latent(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B,T,D] -> (normed latent c_kv [B,T,L], roped shared key k_rope [B,T,R]): what decode caches."""
        ckv = jnp.einsum("BTD,DL->BTL", x, self.wkv_a[...].astype(self.dtype))
        c, k_rope = ckv[..., : self.kv_lora_rank], ckv[..., self.kv_lora_rank :]
        k_rope = self.rope(k_rope[:, :, None, :], positions)[:, :, 0, :]
        return self.kv_norm(c), k_rope

    def heads_kv(self, c: jax.Array, k_rope: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Per-head keys and values rebuilt from the latent: c [B,S,L], k_rope [B,S,R] ->
        (k [B,S,H,N+R], v [B,S,H,V])."""
        dt = self.dtype
        k_nope = jnp.einsum("BSL,LHN->BSHN", c, self.wkv_b_k[...].astype(dt))
        v = jnp.einsum("BSL,LHV->BSHV", c, self.wkv_b_v[...].astype(dt))
        h = k_nope.shape[2]
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None, :], k_rope.shape[:2] + (h, self.rope_dim))], -1)
        return k, v

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """x [B,T,D], positions [B,T], segment_ids [B,T] -> [B,T,D]; causal within segments."""
        dt = self.dtype
        q_nope, q_rope = self.queries(x, positions)
        c, k_rope = self.latent(x, positions)
        k, v = self.heads_kv(c, k_rope)
        q = jnp.concatenate([q_nope, q_rope], axis=-1)
        k = constrain(k, ("batch", "length", "heads", "head_dim"))
        v = constrain(v, ("batch", "length", "heads", "head_dim"))
        out = attention_fn(self.attention_impl)(q, k, v, segment_ids, self.scale)
        return jnp.einsum("BTHV,HVD->BTD", out, self.wo[...].astype(dt))

    # ------------------------------------------------------------------ cached form

    def decode_layout(self) -> dict:
        """W_kvb's halves heads-first, k [..., H,N,L] and v [..., H,L,V] (stored [..., L,H,N] /
        [..., L,H,V]; leading dims: stacked layers): what `absorbed_attention` reads in the
        single-device decode, where XLA:CPU would otherwise transpose both at every step."""
        return {"k": jnp.moveaxis(self.wkv_b_k[...], -3, -1), "v": jnp.swapaxes(self.wkv_b_v[...], -3, -2)}

    def cached(self, x: jax.Array, positions: jax.Array, cache_io: Callable, *, absorbed: bool = True,
               layout: dict | None = None) -> tuple[jax.Array, Any]:
        """x [B,T,D] at positions [B,T] over this layer's cache -> (out [B,T,D], what cache_io
        returned beside the prefix: the updated cache arrays). cache_io: new entries {"c_kv":
        [B,T,L], "k_rope": [B,T,R]} -> (the cache prefix {name: [B,S,...]} with them written,
        the updated arrays). Entry s is visible to a query at position p iff s <= p. absorbed:
        the decode form (else K/V rebuilt from the latent); layout: `decode_layout` arrays."""
        q_nope, q_rope = self.queries(x, positions)
        seen, written = cache_io(dict(zip(("c_kv", "k_rope"), self.latent(x, positions))))
        mask = cache_mask(positions, seen["c_kv"].shape[1])
        attention = self.absorbed_attention if absorbed else self.rebuilt_attention
        return attention(q_nope, q_rope, seen["c_kv"], seen["k_rope"], mask, layout), written

    def absorbed_attention(self, q_nope, q_rope, c, k_rope, mask, layout: dict | None = None) -> jax.Array:
        """Attention over the latent. q_nope [B,T,H,N], q_rope [B,T,H,R], c [B,S,L], k_rope
        [B,S,R], mask [B,1,T,S] -> [B,T,D]. layout (`decode_layout`): W_kvb's halves as k
        [H,N,L], v [H,L,V]."""
        dt = self.dtype
        if layout and "k" in layout:
            q_lat = jnp.einsum("BTHN,HNL->BTHL", q_nope, layout["k"].astype(dt))
        else:
            q_lat = jnp.einsum("BTHN,LHN->BTHL", q_nope, self.wkv_b_k[...].astype(dt))
        b, t, h, _ = q_lat.shape
        # (T, H) as one axis G: one batched dot over B each, which XLA:CPU runs without the
        # transposes a separate T axis costs once T > 1 (speculative verification).
        logits = jnp.einsum("BGL,BSL->BGS", q_lat.reshape(b, t * h, -1), c, preferred_element_type=jnp.float32)
        logits += jnp.einsum("BGR,BSR->BGS", q_rope.reshape(b, t * h, -1), k_rope,
                             preferred_element_type=jnp.float32)
        visible = jnp.broadcast_to(mask[:, 0, :, None, :], (b, t, h, mask.shape[-1])).reshape(b, t * h, -1)
        logits = jnp.where(visible, logits * self.scale, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(dt)
        out_lat = jnp.einsum("BGS,BSL->BGL", probs, c).reshape(b, t, h, -1)
        if layout and "k" in layout:
            out = jnp.einsum("BTHL,HLV->BTHV", out_lat, layout["v"].astype(dt))
        else:
            out = jnp.einsum("BTHL,LHV->BTHV", out_lat, self.wkv_b_v[...].astype(dt))
        return jnp.einsum("BTHV,HVD->BTD", out, self.wo[...].astype(dt))

    def rebuilt_attention(self, q_nope, q_rope, c, k_rope, mask, layout: dict | None = None) -> jax.Array:
        """The same attention with per-head K/V rebuilt from the latent (the training form;
        layout unused)."""
        k, v = self.heads_kv(c, k_rope)
        out = attend(jnp.concatenate([q_nope, q_rope], -1), k, v, mask, self.scale)
        return jnp.einsum("BTHV,HVD->BTD", out, self.wo[...].astype(self.dtype))
