"""One uniform draw per slot and token, bit for bit what `jax.random` gives, as straight-line ops.

    u[b] = jax.random.uniform(fold_in(fold_in(key(seed[b]), sample_index[b]), token_index[b]), ())

JAX lowers its Threefry-2x32 hash on CPU as a 5-trip `while` loop (small compiles); three
hashes a token for every slot made ~200 tiny ops of a decode step, about half of tiny-moe's
ops at batch 16. Here the 20 rounds are unrolled, so XLA fuses them into a few elementwise
kernels. Same algorithm, same key schedule, same bits: a request's samples do not change.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _rotl(x, d: int):
    return (x << np.uint32(d)) | (x >> np.uint32(32 - d))


def threefry2x32(k1, k2, x1, x2):
    """The Threefry-2x32 hash (20 rounds) of counts (x1, x2) under key (k1, k2): uint32 arrays
    of one shape -> (y1, y2)."""
    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x1 = x1 + x2
            x2 = _rotl(x2, r) ^ x1
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x1, x2


def slot_uniforms(seeds, sample_index, token_index) -> jax.Array:
    """[B] seeds (non-negative int32 / uint32), sample and token indices -> [B] f32 in [0, 1)."""
    u32 = lambda a: jnp.asarray(a).astype(jnp.uint32)  # noqa: E731
    zero = jnp.zeros_like(u32(seeds))
    k1, k2 = zero, u32(seeds)  # key(seed)
    k1, k2 = threefry2x32(k1, k2, zero, u32(sample_index))  # fold_in(., sample_index)
    k1, k2 = threefry2x32(k1, k2, zero, u32(token_index))  # fold_in(., token_index)
    b1, b2 = threefry2x32(k1, k2, zero, zero)  # random_bits(., 32, ()), partitionable counts (0, 0)
    bits = (b1 ^ b2) >> np.uint32(32 - 23) | np.uint32(0x3F800000)  # mantissa under exponent 0
    return jnp.maximum(jax.lax.bitcast_convert_type(bits, jnp.float32) - 1.0, 0.0)
