"""One forward over the cache, for prefill chunks, decode steps and speculative verification:
the walk over the decoder's stacks, each layer running its own cached form (`Block.cached`)
over the cache arrays of this package (`r1jax.sampling.cache`).

Each layer writes its new entries into the cache first and then reads its prefix (a static `s`
entries per row) back (`layer_cache`), so every read of a cache array follows its last write
and XLA updates the arrays in place. Reading first and writing after the stack left the last
layer's reads unordered against the write whenever XLA saw the layers straight-line (unrolled
scans, one-layer stacks, the per-layer path), and it then copied every such cache array at every
decode step. 16-bit caches are written as their uint16 bits (`to_bits`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from r1jax.model.decoder import Decoder
from r1jax.sampling.cache import Cache


def to_bits(a: jax.Array) -> jax.Array:
    """A 16-bit float array as its uint16 bits (others unchanged). XLA:CPU scatters into a bf16
    array by converting the whole array to f32 and back; into uint16 it writes in place."""
    return jax.lax.bitcast_convert_type(a, jnp.uint16) if a.dtype.itemsize == 2 else a


def from_bits(a: jax.Array, dtype) -> jax.Array:
    """`to_bits` undone: a's values as `dtype`."""
    return jax.lax.bitcast_convert_type(a, dtype) if a.dtype != dtype else a


def cache_dtype(cache: Cache):
    """The dtype the cache's values hold."""
    return next(iter(next(iter(cache.stacks.values())).values())).dtype


def layer_cache(bits: dict, i, rows, positions, s: int, dtype):
    """Layer i of a stack's bits arrays {name: [Y,slots,max_len,...]} -> cache_io: new entries
    {name: [B,T,...]} -> (entries [:s] of slots rows in new's dtype, read back after writing the
    new ones at (rows[b], positions[b,t]); the updated arrays). rows None: all slots; rows >=
    slots and positions >= max_len are dropped, rows >= slots read the last slot. i may be traced
    (the layer scan)."""
    idx = (jnp.arange(positions.shape[0]) if rows is None else rows)[:, None]

    def read(a):
        return a[i, :, :s] if rows is None else a[i, jnp.minimum(rows, a.shape[1] - 1), :s]

    def cache_io(new: dict):
        out = {k: a.at[i, idx, positions].set(to_bits(new[k].astype(dtype)), mode="drop") for k, a in bits.items()}
        return {k: from_bits(read(a), dtype).astype(new[k].dtype) for k, a in out.items()}, out

    return cache_io


def _scan_stack(blocks, bits: dict, rows, x, positions, s: int, dtype, absorbed: bool, unroll: int = 1):
    """x [B,T,D] through a scanned stack that carries its bits arrays {name: [Y,slots,max_len,...]}
    and writes each layer's new entries before reading them back (`layer_cache`) -> (x, bits)."""
    graphdef, state = nnx.split(blocks)

    def body(carry, layer_state):
        x, bits, i = carry
        x, bits = nnx.merge(graphdef, layer_state).cached(
            x, positions, layer_cache(bits, i, rows, positions, s, dtype), absorbed=absorbed)
        return (x, bits, i + 1), None

    (x, bits, _), _ = jax.lax.scan(body, (x, bits, jnp.int32(0)), state, unroll=unroll)
    return x, bits


def _loop_stack(blocks, layer_states, bits: dict, rows, x, positions, s: int, dtype, absorbed: bool):
    """`_scan_stack` over per-layer (state, `Block.decode_layout`) pairs (`Weights.unstacked`),
    one block after another."""
    graphdef = nnx.graphdef(blocks)
    for i, (layer_state, layout) in enumerate(layer_states):
        x, bits = nnx.merge(graphdef, layer_state).cached(
            x, positions, layer_cache(bits, i, rows, positions, s, dtype), absorbed=absorbed, layout=layout)
    return x, bits


def forward_cached(model: Decoder, stacks: dict, tokens, positions, rows, s: int, dtype, absorbed: bool = True,
                   layer_states: dict | None = None):
    """tokens [B,T] at positions [B,T] into slots rows ([B]; None: all slots, B = slots) through
    the main stacks, attending over cache entries [:s] (static; must exceed every position) ->
    (hidden before the final norm [B,T,D], stacks with the new entries written). The stacks'
    arrays hold `dtype` values, 16-bit ones as their uint16 bits (`to_bits`). layer_states
    (`Weights.layers`): run the stacks from those per-layer arrays instead of scanning."""
    stacks = dict(stacks)
    x = model.embed_tokens(tokens)
    for name, attr in (("dense", "dense_layers"), ("moe", "moe_layers")):
        blocks = getattr(model, attr)
        if blocks is None:
            continue
        if layer_states is not None:
            x, stacks[name] = _loop_stack(blocks, layer_states[attr], stacks[name], rows, x, positions, s, dtype,
                                          absorbed)
        else:
            x, stacks[name] = _scan_stack(blocks, stacks[name], rows, x, positions, s, dtype, absorbed,
                                          model.cfg.scan_unroll)
    return x, stacks


def decode_forward(model: Decoder, stacks: dict, tokens, positions, s: int, dtype, absorbed: bool = True,
                   layer_states: dict | None = None):
    """One token per slot: tokens [B] at positions [B] -> (hidden [B,D], stacks); see `forward_cached`."""
    x, stacks = forward_cached(model, stacks, tokens[:, None], positions[:, None], None, s, dtype, absorbed,
                               layer_states)
    return x[:, 0], stacks


def last_logits(model: Decoder, x) -> jax.Array:
    """hidden [B,D] -> logits [B,V] f32."""
    return model.head(model.norm(x[:, None]))[:, 0]
