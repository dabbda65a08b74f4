"""CPU-only expert kernels: speed paths for XLA:CPU, never used on TPU/GPU.

On TPU/GPU the routed experts run as `r1jax.model.moe.dropless_experts`: tokens sorted by expert
into one `jax.lax.ragged_dot` (grouped matmul) per projection, or expert parallelism's dispatch
(`r1jax.parallel.expert`). On CPU neither is fast: XLA:CPU's ragged_dot is a slow generic loop,
and at decode's few rows a matmul is bound by op count and weight copies, not FLOPs. So:

  `blocked_experts`      `dropless_experts` on CPU (training, prefill): each expert's pairs in
                         whole blocks of `block_rows` rows, one dense batched matmul per
                         projection.
  `small_batch_experts`  the single-device CPU decode's kernel (`r1jax.sampling.layout`), by size:
                         `pair_experts`, `bucketed_experts`, every token through every expert,
                         or `blocked_experts`.
  `dense_moe`            tiny experts' decode as two plain dots, routed and shared experts in
                         one matrix pair (`dense_moe_weights`, `MoE.decode`).

Each was picked by timing on CPU; they compute what `dropless_experts` computes (the tests compare
both against NumPy). Nothing here checks the backend: the callers do (`r1jax.parallel.backend`).

Letters: N tokens, K experts per token, M = N*K (token, expert) pairs, D width, E experts,
F expert hidden.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from r1jax.model.moe import Routing


def block_rows(m: int, e: int) -> int:
    """Rows per block of `blocked_experts` for m (token, expert) pairs over e experts: a power of
    two near m / 4E (partial blocks, ~E * b / 2 rows, stay ~1/8 of m), at least m / E up to 128
    (each block copies its expert's weights: small-moe's 3.5 MB experts want few blocks) and at
    most 1024: larger blocks pay off on large batches, smaller ones waste less padding on small
    ones (chosen by timing forward + backward on CPU)."""
    pow2 = lambda n: 2 ** int(math.log2(max(n, 1)))  # noqa: E731
    return int(min(1024, max(32, pow2(m // (4 * e)), min(128, pow2(m // e)))))


def blocked_experts(x, routing: Routing, w_gate, w_up, w_down):
    """`dropless_experts` on CPU: pair (n, j) goes to row `rank within its expert` of
    its expert's run of whole blocks of b rows; every block is one dense [b, D] x [D, F] matmul
    with its expert's weights (gathered per block). No sort: ranks come from a cumulative sum of
    one-hot expert ids, and results come back by gathering the same rows (faster on CPU than
    an argsort both ways).
    Static shapes: at most ceil(M / b) + min(E, M) blocks (only non-empty experts add a partial
    block). b: `block_rows`."""
    n, k = routing.experts.shape
    e, d, _ = w_gate.shape
    m = n * k
    b = block_rows(m, e)
    flat = routing.experts.reshape(-1)
    onehot = (flat[:, None] == jnp.arange(e)[None, :]).astype(jnp.int32)  # [M, E]
    sizes = onehot.sum(0)
    rank = jnp.take_along_axis(jnp.cumsum(onehot, axis=0), flat[:, None], axis=1)[:, 0] - 1
    padded = (sizes + b - 1) // b * b
    padded_ends = jnp.cumsum(padded)
    dest = padded_ends[flat] - padded[flat] + rank  # [M], distinct
    blocks = -(-m // b) + min(e, m)
    block_expert = jnp.minimum(jnp.searchsorted(padded_ends, jnp.arange(blocks) * b, side="right"), e - 1)
    xb = jnp.zeros((blocks * b, d), x.dtype).at[dest].set(jnp.repeat(x, k, axis=0), unique_indices=True)
    xb = xb.reshape(blocks, b, d)
    h = jax.nn.silu(jnp.einsum("nbd,ndf->nbf", xb, w_gate[block_expert]))
    h = h * jnp.einsum("nbd,ndf->nbf", xb, w_up[block_expert])
    yb = jnp.einsum("nbf,nfd->nbd", h, w_down[block_expert])
    y = yb.reshape(blocks * b, d)[dest].reshape(n, k, d)
    return jnp.einsum("NKD,NK->ND", y, routing.weights.astype(y.dtype))


def small_batch_experts(x, routing, w_gate, w_up, w_down, *, kernel: str = "auto"):
    """`dropless_experts` for a few tokens, by size:
      fewer (token, expert) pairs than half the experts: each pair's weights gathered and
        applied as a matvec (a gather copies, so reading all experts in place costs about as
        much as gathering half of them);
      more, with large experts: `bucketed_experts`, every expert's weights read once, in place;
      more, with experts so small that op count, not memory, is the cost (tiny-moe): every
        token through every expert as one batched matmul per projection, then each token's K
        outputs picked and weighted.
    Once `blocked_experts` (CPU's `dropless_experts`) would compute fewer rows than every-expert,
    it takes over. The engine's per-layer decode runs tiny experts past the pairs branch as
    `dense_moe` instead (`MoE.decode`). Each branch was picked against the others by timing the
    decode at batch 1 and 16 on CPU."""
    del kernel  # an `ExpertFn`; these CPU paths need no grouped-matmul kernel
    n, k = routing.experts.shape
    e, d, f = w_gate.shape
    if 2 * n * k < e:
        return pair_experts(x, routing, w_gate, w_up, w_down), {}
    if n * e > n * k + 32 * min(e, n * k):
        return blocked_experts(x, routing, w_gate, w_up, w_down), {}
    if e * d * f > 1 << 18:
        return bucketed_experts(x, routing, w_gate, w_up, w_down), {}
    xe = jnp.broadcast_to(x, (e,) + x.shape)
    h = jax.nn.silu(jnp.einsum("END,EDF->ENF", xe, w_gate)) * jnp.einsum("END,EDF->ENF", xe, w_up)
    y = jnp.einsum("ENF,EFD->END", h, w_down)
    picked = y[routing.experts, jnp.arange(n)[:, None]]  # [N,K,D]
    return jnp.einsum("NKD,NK->ND", picked, routing.weights.astype(y.dtype)), {}


def dense_moe_weights(w_gate, w_up, w_down, shared: tuple | None = None) -> dict:
    """Routed experts [E,D,F], [E,D,F], [E,F,D] and the shared expert's (gate [D,S], up [D,S],
    down [S,D]; None: none) as `dense_moe` reads them: gate_up [D, 2M] (routed gate columns
    e*F + j, the shared gate's, then the same for up), down [M, D]; M = EF + S."""
    e, d, f = w_gate.shape
    cols = lambda w: jnp.transpose(w, (1, 0, 2)).reshape(d, e * f)  # noqa: E731
    sg, su, sd = shared if shared is not None else (w_gate[0, :, :0], w_up[0, :, :0], w_down[0, :0])
    return {"gate_up": jnp.concatenate([cols(w_gate), sg, cols(w_up), su], axis=1),
            "down": jnp.concatenate([w_down.reshape(e * f, d), sd], axis=0)}


def dense_moe(x, routing: Routing, gate_up, down, e: int, f: int):
    """x [N, D] through all e routed experts of hidden f and the shared expert
    (`dense_moe_weights`) as two plain matmuls: h [N, M] = silu(x W_gate) * x W_up, routed
    columns scaled by the token's combine weight for their expert (0 off its K), shared ones by
    1, then [N, M] x [M, D]: two dots where the batched kernels and the shared MLP take six.
    For tiny experts' decode this is faster than the blocked kernel at many slots and on par
    with the every-expert kernel plus the shared MLP at few (see the README)."""
    n, m = x.shape[0], down.shape[0]
    gu = jnp.einsum("ND,DM->NM", x, gate_up.astype(x.dtype)).reshape(n, 2, m // f, f)  # shared width: f multiples
    combine = jnp.sum(jnp.where(routing.experts[:, :, None] == jnp.arange(e), routing.weights[:, :, None], 0.0), 1)
    scale = jnp.concatenate([combine, jnp.ones((n, m // f - e), combine.dtype)], axis=1)  # [N, E + shared]
    h = jax.nn.silu(gu[:, 0]) * gu[:, 1] * scale.astype(x.dtype)[:, :, None]
    return jnp.einsum("NM,MD->ND", h.reshape(n, m), down.astype(x.dtype))


def pair_experts(x, routing: Routing, w_gate, w_up, w_down):
    """x [N, D] through each (token, expert) pair's own gathered weights [N*K, D, F]."""
    n, k = routing.experts.shape
    flat = routing.experts.reshape(-1)
    xs = jnp.repeat(x, k, axis=0)
    h = jax.nn.silu(jnp.einsum("MD,MDF->MF", xs, w_gate[flat])) * jnp.einsum("MD,MDF->MF", xs, w_up[flat])
    y = jnp.einsum("MF,MFD->MD", h, w_down[flat]).reshape(n, k, -1)
    return jnp.einsum("NKD,NK->ND", y, routing.weights.astype(y.dtype))


def bucketed_experts(x, routing: Routing, w_gate, w_up, w_down):
    """x [N, D] through per-expert buffers [E, C, D] as batched matmuls over the experts in
    place, C the smallest power of two (from ~N K / E) that holds the busiest expert's pairs, N
    at most: one `lax.switch` branch per C, so nothing drops and the rows computed follow the
    routing (XLA:CPU's batched matmul grows costlier with C well before memory bounds it)."""
    n, k = routing.experts.shape
    e, d, _ = w_gate.shape
    flat = routing.experts.reshape(-1)
    onehot = (flat[:, None] == jnp.arange(e)[None, :]).astype(jnp.int32)  # [M, E]
    rank = jnp.take_along_axis(jnp.cumsum(onehot, axis=0), flat[:, None], axis=1)[:, 0] - 1
    busiest = onehot.sum(0).max()
    caps = [c for c in (2**i for i in range(int(math.log2(n)) + 1)) if c >= n * k // e and c < n] + [n]

    def run(c):
        def branch(x):
            slot = flat * c + rank  # distinct, < E * c in this branch
            buf = jnp.zeros((e * c, d), x.dtype).at[slot].set(jnp.repeat(x, k, axis=0), mode="drop",
                                                               unique_indices=True).reshape(e, c, d)
            h = jax.nn.silu(jnp.einsum("ECD,EDF->ECF", buf, w_gate)) * jnp.einsum("ECD,EDF->ECF", buf, w_up)
            return jnp.einsum("ECF,EFD->ECD", h, w_down).reshape(e * c, d)[slot]
        return branch

    y = jax.lax.switch(jnp.searchsorted(jnp.asarray(caps), busiest), [run(c) for c in caps], x)
    return jnp.einsum("NKD,NK->ND", y.reshape(n, k, d), routing.weights.astype(y.dtype))
