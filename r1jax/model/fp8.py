"""Block-scaled FP8 weights, DeepSeek-V3's released format (spec: `quantization_config`).

A weight W [..., R, C] is stored as `float8_e4m3fn` Q with a float32 `scale_inv` S of shape
[..., ceil(R/b0), ceil(C/b1)] (b = `weight_block_size`, [128, 128] in the released files):
W[r, c] = Q[r, c] * S[r // b0, c // b1]. Edge blocks are partial when R or C is not a
multiple of the block. Both functions take NumPy or JAX arrays and return the same kind.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np

FP8 = ml_dtypes.float8_e4m3fn
FP8_MAX = float(ml_dtypes.finfo(FP8).max)  # 448
BLOCK = (128, 128)


def _xp(x):
    return np if isinstance(x, np.ndarray) else jnp


def scale_shape(shape: tuple[int, ...], block: tuple[int, int] = BLOCK) -> tuple[int, ...]:
    """The `scale_inv` shape of a weight of `shape`: its last two dims in blocks, rounded up."""
    *lead, r, c = shape
    return (*lead, -(-r // block[0]), -(-c // block[1]))


def dequantize(q, scale_inv, block: tuple[int, int] = BLOCK, dtype=np.float32):
    """Q [..., R, C] (fp8) and S [..., ceil(R/b0), ceil(C/b1)] -> W = Q * S blockwise, in `dtype`."""
    xp = _xp(q)
    r, c = q.shape[-2:]
    s = xp.repeat(xp.repeat(scale_inv.astype(np.float32), block[0], axis=-2), block[1], axis=-1)[..., :r, :c]
    return (q.astype(np.float32) * s).astype(dtype)


def quantize(w, block: tuple[int, int] = BLOCK):
    """W [..., R, C] -> (Q fp8, S f32) with each block's max |W| mapped to 448, as the released
    checkpoints were made. `dequantize(*quantize(w))` is within fp8's 3-bit mantissa of w."""
    xp = _xp(w)
    *lead, r, c = w.shape
    rb, cb = scale_shape(w.shape, block)[-2:]
    pad = [(0, 0)] * len(lead) + [(0, rb * block[0] - r), (0, cb * block[1] - c)]
    blocks = xp.pad(w.astype(np.float32), pad).reshape(*lead, rb, block[0], cb, block[1])
    amax = xp.abs(blocks).max(axis=(-3, -1))  # [..., rb, cb]
    scale_inv = xp.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
    s = xp.repeat(xp.repeat(scale_inv, block[0], axis=-2), block[1], axis=-1)[..., :r, :c]
    q = (w.astype(np.float32) / s).astype(FP8)
    return q, scale_inv
