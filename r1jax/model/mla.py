"""Multi-head Latent Attention (DeepSeek-V2/V3), the training / prefill form.

Letters: B batch, T length, D model width, H heads, Q q_lora rank, L kv_lora rank,
N nope head dim (qk_nope_head_dim), R rope head dim, V value head dim.

    q        = W_qb · RMSNorm(W_qa · x)           (or W_q · x without q LoRA)   [B,T,H,N+R]
    [c ; kr] = W_kva · x                          c: latent [B,T,L], kr: ONE shared rope key [B,T,R]
    k_nope   = W_kb · RMSNorm(c),  v = W_vb · RMSNorm(c)                             [B,T,H,N], [B,T,H,V]
    k        = [k_nope ; rope(kr)] per head,  q = [q_nope ; rope(q_rope)]

The W_kvb of the released weights is stored here split in its key half `wkv_b_k` [L,H,N] and
value half `wkv_b_v` [L,H,V], the two sides the absorbed decode folds into q and o.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from r1jax.config import ModelConfig
from r1jax.model.layers import RMSNorm, RotaryEmbedding, causal_attend, dtypes, normal, param, softmax_scale
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

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """x [B,T,D], positions [B,T], segment_ids [B,T] -> [B,T,D]; causal within segments."""
        dt = self.dtype
        q_nope, q_rope = self.queries(x, positions)
        c, k_rope = self.latent(x, positions)
        k_nope = jnp.einsum("BSL,LHN->BSHN", c, self.wkv_b_k[...].astype(dt))
        v = jnp.einsum("BSL,LHV->BSHV", c, self.wkv_b_v[...].astype(dt))
        h = q_nope.shape[2]
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None, :], k_rope.shape[:2] + (h, self.rope_dim))], -1)
        q = jnp.concatenate([q_nope, q_rope], axis=-1)
        k = constrain(k, ("batch", "length", "heads", "head_dim"))
        v = constrain(v, ("batch", "length", "heads", "head_dim"))
        out = causal_attend(q, k, v, segment_ids, self.scale)
        return jnp.einsum("BTHV,HVD->BTD", out, self.wo[...].astype(dt))
