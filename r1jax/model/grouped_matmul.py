"""The grouped matmul of the routed experts, and which kernel runs it (`parallel.expert_kernel`).

`grouped_matmul(x, w, group_sizes, kernel)`: rows of x [M, K] come in runs, group g's run the next
group_sizes[g] rows, and each run is multiplied by its group's w[g] [K, N]. Kernels:
  ragged_dot  `jax.lax.ragged_dot` (XLA's grouped matmul; GPU's fast path).
  megablox    the Pallas TPU kernel `jax.experimental.pallas.ops.tpu.megablox.ops.gmm` (custom VJP:
              `gmm` for dx, `tgmm` for dw). A Mosaic TPU kernel: on any other backend it runs in
              Pallas interpret mode (correct and slow: for tests).
`resolve_expert_kernel` says which one a config runs: "auto" is megablox on TPU, ragged_dot on
GPU and "blocked" on CPU, `cpu_experts.blocked_experts`, a whole-SwiGLU CPU path rather than a
grouped matmul (XLA:CPU's ragged_dot is a slow generic loop).

Megablox tiling (`megablox_tiling`): the kernel needs M to be a whole number of row tiles, and
its backward pass swaps the roles of K and N (dx = dy [M, N] . w^T), so one tile t serves both:
  M  padded with zero rows up to a multiple of tm = min(128, M rounded up to 16), the pad rows
     given to the last group (zeros in, zeros out, nothing added to dw) and sliced off. Small tiles
     because every group boundary inside a tile costs that tile once more.
  K, N  t = 512, 256 or 128, the largest dividing both. Dims that are no multiple of 128 (toy
     models only: DeepSeek's all are) are zero-padded to one, a copy of the weights.
Rows past sum(group_sizes) belong to no group: both kernels give zeros there and no gradient
(megablox by zeroing them before the kernel: it would leave them uninitialised).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from r1jax.parallel.backend import backend

AUTO_KERNEL = {"tpu": "megablox", "gpu": "ragged_dot", "cpu": "blocked"}
KERNELS = ("blocked", "ragged_dot", "megablox")
LANE = 128  # TPU lane width: K and N tiles are multiples of it
TILE_M = 128


def resolve_expert_kernel(name: str = "auto", platform: str | None = None) -> str:
    """The routed experts' kernel that `parallel.expert_kernel` = name runs on `platform` ("cpu",
    "gpu", "tpu"; None: this process's backend): "blocked", "ragged_dot" or "megablox". Explicit
    names pass through, whatever the platform."""
    if name == "auto":
        return AUTO_KERNEL.get(platform or backend(), "ragged_dot")
    if name not in KERNELS:
        raise ValueError(f"expert kernel must be 'auto' or one of {KERNELS}, got {name!r}")
    return name


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, kernel: str) -> jax.Array:
    """x [M, K], w [G, K, N], group_sizes [G] int32 -> [M, N]: group g's rows times w[g], rows
    past sum(group_sizes) zero. kernel: "ragged_dot" or "megablox"."""
    if kernel == "ragged_dot":
        return jax.lax.ragged_dot(x, w, group_sizes)
    if kernel == "megablox":
        return _megablox(x, w, group_sizes)
    raise ValueError(f"grouped_matmul kernel must be 'ragged_dot' or 'megablox', got {kernel!r}")


def grouped_swiglu(xs, group_sizes, w_gate, w_up, w_down, kernel: str) -> jax.Array:
    """xs [M, D] grouped by expert (group_sizes [E]) through the experts' SwiGLU, w_gate/w_up
    [E, D, F], w_down [E, F, D] -> [M, D]: one grouped matmul per projection."""
    gmm = lambda a, w: grouped_matmul(a, w, group_sizes, kernel)  # noqa: E731
    return gmm(jax.nn.silu(gmm(xs, w_gate)) * gmm(xs, w_up), w_down)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def megablox_tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
    """(tm, tk, tn) for `_megablox` on x [m, k] and w [G, k, n], k and n already multiples of 128."""
    tm = min(TILE_M, _round_up(max(m, 1), 16))
    t = next(t for t in (4 * LANE, 2 * LANE, LANE) if k % t == 0 and n % t == 0)
    return tm, t, t


def _megablox(x, w, group_sizes):
    # Pallas TPU (Mosaic): imported only when used.
    from jax.experimental.pallas.ops.tpu.megablox import ops

    (m, k), n = x.shape, w.shape[-1]
    kp, np_ = _round_up(k, LANE), _round_up(n, LANE)
    tiling = megablox_tiling(m, kp, np_)
    mp = _round_up(m, tiling[0])
    group_sizes = group_sizes.astype(jnp.int32)
    total = group_sizes.sum()
    x = jnp.where((jnp.arange(m) < total)[:, None], x, 0)
    x = jnp.pad(x, ((0, mp - m), (0, kp - k)))
    if (kp, np_) != (k, n):
        w = jnp.pad(w, ((0, 0), (0, kp - k), (0, np_ - n)))
    group_sizes = group_sizes.at[-1].add(mp - total)  # every row in a group: none left uninitialised
    # gmm(lhs, rhs, group_sizes, preferred_element_type, tiling, group_offset, existing_out,
    # transpose_rhs, interpret), positional: its custom VJP names the static ones by position.
    y = ops.gmm(x, w, group_sizes, x.dtype, tiling, None, None, False, backend() != "tpu")
    return y[:m, :n]
