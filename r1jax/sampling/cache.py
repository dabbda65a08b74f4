"""The static decode cache: preallocated once, written in place by the compiled steps.

Letters: Y layers of a stack, B slots, S max_len, L kv_lora rank, R rope head dim, G kv heads,
K head dim.

MLA (spec §2) caches per layer and token only what decode needs: the normed latent `c_kv` [L]
and the roped shared key `k_rope` [R], i.e. L + R values (576 for V3) instead of per-head K
and V. GQA students cache roped K and V [G, K] each. One entry per stack of the decoder:

    stacks["dense"] / stacks["moe"]: {"c_kv": [Y,B,S,L], "k_rope": [Y,B,S,R]}  (MLA)
                                     {"k": [Y,B,S,G,K], "v": [Y,B,S,G,K]}      (GQA)
    stacks["mtp"]: the MTP blocks' caches (only when asked for: speculative decoding)
    lengths [B] int32: tokens written per slot. Entries at or past a slot's length are junk
    (padding of a prefill bucket, a rejected draft) and are masked, then overwritten.

Slots are split over the `batch` mesh axes and GQA kv heads over `model`, by the rules table.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding

from r1jax.config import ModelConfig
from r1jax.parallel.rules import MeshAxes
from r1jax.parallel.sharding import spec_for


@struct.dataclass
class Cache:
    stacks: dict[str, dict[str, jax.Array]]
    lengths: jax.Array  # [B] int32

    @property
    def slots(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_len(self) -> int:
        return next(iter(next(iter(self.stacks.values())).values())).shape[2]


def entry_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str | None, ...]]]:
    """Per layer and token: name -> (shape, logical axes) of what one cache entry holds."""
    if cfg.is_mla:
        return {"c_kv": ((cfg.kv_lora_rank,), ("kv_lora",)), "k_rope": ((cfg.qk_rope_head_dim,), (None,))}
    gk = (cfg.kv_heads, cfg.gqa_head_dim)
    return {"k": (gk, ("kv_heads", "head_dim")), "v": (gk, ("kv_heads", "head_dim"))}


def stack_layers(cfg: ModelConfig, mtp: bool = False) -> dict[str, int]:
    out = {"dense": cfg.num_dense_layers, "moe": cfg.num_moe_layers}
    if mtp:
        out["mtp"] = cfg.num_nextn_predict_layers
    return {k: v for k, v in out.items() if v}


def bytes_per_token(cfg: ModelConfig, dtype=jnp.bfloat16, mtp: bool = False) -> int:
    """Cache bytes one token costs over all layers (V3: 576 values x 2 B x 61 = 70,272 B)."""
    per_layer = sum(int(np.prod(shape)) for shape, _ in entry_shapes(cfg).values())
    return per_layer * jnp.dtype(dtype).itemsize * sum(stack_layers(cfg, mtp).values())


def cache_shardings(cfg: ModelConfig, slots: int, max_len: int, mesh: Mesh, rules: dict[str, MeshAxes],
                    mtp: bool = False) -> Cache:
    """A `Cache`-shaped tree of NamedShardings."""
    stacks = {}
    for name, layers in stack_layers(cfg, mtp).items():
        stacks[name] = {
            k: NamedSharding(mesh, spec_for((layers, slots, max_len) + shape, ("layers", "batch", "length") + axes,
                                         rules, mesh))
            for k, (shape, axes) in entry_shapes(cfg).items()
        }
    return Cache(stacks, NamedSharding(mesh, spec_for((slots,), ("batch",), rules, mesh)))


def init_cache(cfg: ModelConfig, slots: int, max_len: int, *, dtype=jnp.bfloat16, mtp: bool = False,
               mesh: Mesh | None = None, rules: dict[str, MeshAxes] | None = None) -> Cache:
    """Zeros [layers, slots, max_len, ...] per stack, created directly in their sharded layout."""

    def build() -> Cache:
        stacks = {
            name: {k: jnp.zeros((layers, slots, max_len) + shape, dtype) for k, (shape, _) in entry_shapes(cfg).items()}
            for name, layers in stack_layers(cfg, mtp).items()
        }
        return Cache(stacks, jnp.zeros((slots,), jnp.int32))

    if mesh is None:
        return build()  # eager zeros: compiled once per shape, not once per call as a fresh jit of `build`
    return jax.jit(build, out_shardings=cache_shardings(cfg, slots, max_len, mesh, rules, mtp))()


def cache_bytes(cache: Cache) -> int:
    return sum(a.nbytes for stack in cache.stacks.values() for a in stack.values())
