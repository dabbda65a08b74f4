"""Parameter counts from `jax.eval_shape` (nothing allocated), KV-cache bytes and FLOPs per token.

    python -m r1jax.model.summary configs/model/deepseek-v3-671b.yaml [key=value ...]
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from r1jax.config import ModelConfig, load_model, parse_options
from r1jax.model.decoder import Decoder
from r1jax.model.layers import causal_blocks


@dataclasses.dataclass(frozen=True)
class ParamCount:
    total: int  # main model, embedding and head included, MTP excluded
    active: int  # per token: total less the routed experts a token does not use
    mtp: int  # the MTP modules' own parameters (embedding and head are shared)


def abstract_model(cfg: ModelConfig) -> Decoder:
    """The model with `ShapeDtypeStruct` leaves: shapes and metadata, no memory."""
    return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))


def _size(tree) -> int:
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(tree)))


@functools.lru_cache(maxsize=16)  # an abstract trace of the whole model: seconds on a small CPU
def count_params(cfg: ModelConfig) -> ParamCount:
    model = abstract_model(cfg)
    params = nnx.state(model, nnx.Param)
    mtp = _size(params["mtp"]) if "mtp" in params else 0
    total = _size(params) - mtp
    unused_experts = cfg.n_routed_experts - cfg.num_experts_per_tok if cfg.is_moe else 0
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    active = total - cfg.num_moe_layers * unused_experts * per_expert
    return ParamCount(total=total, active=active, mtp=mtp)


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype=jnp.bfloat16) -> int:
    """Decode cache per token over all layers: MLA keeps the normed latent and the rope key;
    GQA keeps K and V of every kv head."""
    per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim if cfg.is_mla else 2 * cfg.kv_heads * cfg.gqa_head_dim
    return per_layer * cfg.num_hidden_layers * jnp.dtype(dtype).itemsize


def mha_cache_bytes_per_token(cfg: ModelConfig, dtype=jnp.bfloat16) -> int:
    """What plain multi-head attention with the same heads would cache (for comparison)."""
    k = cfg.qk_head_dim if cfg.is_mla else cfg.gqa_head_dim
    v = cfg.v_head_dim if cfg.is_mla else cfg.gqa_head_dim
    return cfg.num_attention_heads * (k + v) * cfg.num_hidden_layers * jnp.dtype(dtype).itemsize


def matmul_params_per_token(cfg: ModelConfig) -> int:
    """Weights one training token multiplies by (forward), MTP included. Conventions: the
    embedding is a lookup, not a matmul (left out); the LM head counts, and counts again for
    every MTP depth (the shared head runs once per depth); a MoE layer counts its router, its
    shared experts and `num_experts_per_tok` routed experts; norms count (a few thousand
    parameters, not matmuls, well under 0.1%)."""
    count = count_params(cfg)
    d, k = cfg.hidden_size, cfg.num_nextn_predict_layers
    n = count.active - cfg.vocab_size * d
    if k:
        unused = (cfg.n_routed_experts - cfg.num_experts_per_tok) * 3 * d * cfg.moe_intermediate_size if cfg.is_moe else 0
        n += count.mtp - k * unused + k * cfg.vocab_size * d
    return n


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, *, computed: bool = False) -> float:
    """Forward FLOPs of the scores q·k and the mix p·v per token over all layers (MTP's too):
    2·H·(K + V)·S per layer, S the keys a query sees on average. Model FLOPs (`computed=False`)
    count causal attention, S = T/2 (as MaxText and nanoGPT-style MFU do); `computed=True` counts
    what `causal_attend` runs: query block i of n sees (i+1)/n of the keys, S = T(n+1)/2n."""
    if cfg.is_mla:
        qk, v = cfg.qk_head_dim, cfg.v_head_dim
    else:
        qk = v = cfg.gqa_head_dim
    n = causal_blocks(seq_len)
    keys = seq_len * (n + 1) / (2 * n) if computed else seq_len / 2
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    return 2.0 * cfg.num_attention_heads * (qk + v) * keys * layers


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward = 3x forward): 6 · active matmul
    parameters (`matmul_params_per_token`), plus causal attention scores
    (`attention_flops_per_token`: q·k and p·v, half the square on average)."""
    return 3.0 * (2.0 * matmul_params_per_token(cfg) + attention_flops_per_token(cfg, seq_len))


def summary(cfg: ModelConfig) -> str:
    c = count_params(cfg)
    rows = [
        ("parameters (main)", f"{c.total / 1e9:.2f} B" if c.total > 1e9 else f"{c.total / 1e6:.2f} M"),
        ("active per token", f"{c.active / 1e9:.2f} B" if c.active > 1e9 else f"{c.active / 1e6:.2f} M"),
        ("MTP modules", f"{c.mtp / 1e9:.2f} B" if c.mtp > 1e9 else f"{c.mtp / 1e6:.2f} M"),
        ("layers (dense + MoE)", f"{cfg.num_dense_layers} + {cfg.num_moe_layers}"),
        ("attention", "MLA" if cfg.is_mla else f"GQA {cfg.num_attention_heads}/{cfg.kv_heads}"),
        ("KV cache / token (bf16)", f"{kv_cache_bytes_per_token(cfg):,} B"),
        ("  plain MHA would need", f"{mha_cache_bytes_per_token(cfg):,} B"),
    ]
    return "\n".join(f"  {k:<26}{v}" for k, v in rows)


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: python -m r1jax.model.summary CONFIG [key=value ...]")
    (path,), _, overrides = parse_options(argv, positional=("CONFIG",))
    cfg = load_model(path, *overrides)
    print(path)
    print(summary(cfg))


if __name__ == "__main__":
    main(sys.argv[1:])
