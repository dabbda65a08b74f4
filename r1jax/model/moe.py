"""DeepSeekMoE: shared experts plus routed SwiGLU experts, aux-loss-free balancing (V3).

Letters: B batch, T length, N tokens (B*T), D width, E routed experts, K experts per token,
F expert hidden, G expert groups.

Routing (spec §3), `route`:
  V3: s = sigmoid(x W_g); choice by s + b (b: `RoutingBias`, no gradient), group-limited: keep the
      `topk_group` groups with the best top-2 sums, then top-K experts inside them;
      weights w = s[chosen] (/ Σ if norm_topk_prob) · routed_scaling_factor.
  V2: s = softmax(x W_g); greedy top-K (or group-limited by group max); no bias.
Expert compute is dropless (`dropless_experts`): each expert's tokens contiguous, one grouped matmul.
Under expert parallelism `r1jax.parallel.expert` swaps in its dispatch through `use_expert_fn`.

FP8 experts (`ModelConfig.expert_dtype: float8_e4m3fn`, sampling only): w_gate / w_up / w_down
are `FP8Weight`s in r1jax's [in, out] orientation (each expert's HF weight [out, in] transposed),
each with a float32 `<name>_scale_inv` [E, ceil(in/b_in), ceil(out/b_out)], HF's scale grid
transposed the same way, (b_out, b_in) = `fp8_block_size`. `MoE.expert_weights` dequantizes them
where the layer runs, so inside a scanned, compiled step only one layer's experts exist in the
compute dtype at a time.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from r1jax.config import ModelConfig
from r1jax.model import fp8
from r1jax.model.layers import MLP, dtypes, normal, param, zeros
from r1jax.parallel.rules import constrain


class RoutingBias(nnx.Variable):
    """The aux-loss-free correction bias b [E]: a state of its own, never a `Param`, so the
    optimizer never sees it (no gradient, no weight decay, no Adam moments)."""


class FP8Weight(nnx.Variable):
    """A routed expert weight in `float8_e4m3fn`, or its float32 block `scale_inv`: sampling-only
    storage (`ModelConfig.expert_dtype`), never a `Param`, so it lands in `extra` and the
    optimizer never sees it."""


EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


class Routing(NamedTuple):
    weights: jax.Array  # [N, K] combine weights (f32)
    experts: jax.Array  # [N, K] int32 chosen experts
    scores: jax.Array  # [N, E] f32 sigmoid / softmax scores (no bias)
    mask: jax.Array | None = None  # [N] bool, the real tokens (None: all); capacity dispatch serves them first


def route(logits: jax.Array, bias: jax.Array | None, cfg: ModelConfig) -> Routing:
    """logits [N, E] f32 -> the chosen experts and their combine weights."""
    n, e = logits.shape
    scores = jax.nn.sigmoid(logits) if cfg.scoring_func == "sigmoid" else jax.nn.softmax(logits, axis=-1)
    choice = scores + bias if (bias is not None and cfg.topk_method == "noaux_tc") else scores
    if cfg.n_group > 1 and cfg.topk_method != "greedy":
        grouped = choice.reshape(n, cfg.n_group, e // cfg.n_group)
        if cfg.topk_method == "noaux_tc":
            group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [N, G]
        else:
            group_score = grouped.max(-1)
        _, keep = jax.lax.top_k(group_score, cfg.topk_group)
        group_mask = jnp.zeros((n, cfg.n_group), bool).at[jnp.arange(n)[:, None], keep].set(True)
        expert_mask = jnp.repeat(group_mask, e // cfg.n_group, axis=1)
        choice = jnp.where(expert_mask, choice, -jnp.inf)
    _, experts = jax.lax.top_k(jax.lax.stop_gradient(choice), cfg.num_experts_per_tok)
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return Routing(weights * cfg.routed_scaling_factor, experts.astype(jnp.int32), scores)


def expert_loads(experts: jax.Array, num_experts: int, mask: jax.Array | None = None) -> jax.Array:
    """[N, K] chosen experts -> [E] f32 token counts; mask [N] (None: all): only real tokens count."""
    ones = jnp.ones(experts.shape, jnp.float32) if mask is None else jnp.broadcast_to(
        mask.astype(jnp.float32)[:, None], experts.shape)
    return jnp.zeros((num_experts,), jnp.float32).at[experts.reshape(-1)].add(ones.reshape(-1))


def sequence_balance_loss(routing: Routing, batch: int, cfg: ModelConfig, mask: jax.Array | None = None) -> jax.Array:
    """alpha · mean over sequences of Σ_i f_i P_i (spec §3), f_i = E/(K T) · #{t: i in TopK(t)},
    P_i = mean_t s_i,t / Σ_j s_j,t. mask [N] (None: all): T and the sums run over real tokens only,
    and rows without any are left out of the mean."""
    if cfg.aux_loss_alpha == 0.0:
        return jnp.zeros((), jnp.float32)
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    scores = routing.scores.reshape(batch, -1, e)
    t = scores.shape[1]
    real = jnp.ones((batch, t), jnp.float32) if mask is None else mask.reshape(batch, t).astype(jnp.float32)
    count = real.sum(1, keepdims=True)  # [B, 1]
    chosen = jax.nn.one_hot(routing.experts.reshape(batch, t, k), e, dtype=jnp.float32).sum(2)  # [B, T, E]
    hits = jnp.einsum("BTE,BT->BE", chosen, real)
    f = jax.lax.stop_gradient(hits * e / (k * jnp.maximum(count, 1.0)))
    p = jnp.einsum("BTE,BT->BE", scores / scores.sum(-1, keepdims=True), real) / jnp.maximum(count, 1.0)
    rows = (count[:, 0] > 0).astype(jnp.float32)
    return cfg.aux_loss_alpha * jnp.sum(jnp.sum(f * p, axis=-1) * rows) / jnp.maximum(rows.sum(), 1.0)


def routing_bias_update(bias: jax.Array, loads: jax.Array, gamma: float) -> jax.Array:
    """b_i += gamma · sign(mean_load - load_i), loads [..., E] counted over the global batch."""
    return bias + gamma * jnp.sign(loads.mean(-1, keepdims=True) - loads)


def dropless_experts(x, routing: Routing, w_gate, w_up, w_down) -> tuple[jax.Array, dict]:
    """x [N, D] through the chosen experts, nothing dropped. w_gate/w_up [E, D, F], w_down [E, F, D].

    Each expert's (token, expert) pairs are made contiguous and run as one grouped matmul per
    projection: on TPU/GPU sorted by expert into `ragged_dot` (grouped-matmul kernels); on CPU,
    where XLA's ragged_dot is a slow generic loop, scattered into blocks padded to whole tiles.
    """
    if jax.default_backend() == "cpu":
        return _blocked_experts(x, routing, w_gate, w_up, w_down), {}
    n, k = routing.experts.shape
    flat = routing.experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    ys = _ragged_swiglu(x[order // k], flat[order], w_gate, w_up, w_down)  # [N*K, D] in expert order
    y = ys[jnp.argsort(order)].reshape(n, k, -1)
    return jnp.einsum("NKD,NK->ND", y, routing.weights.astype(y.dtype)), {}


def _ragged_swiglu(xs, sorted_experts, w_gate, w_up, w_down):
    """xs [M, D] sorted by expert -> [M, D] with one `ragged_dot` per projection."""
    sizes = jnp.bincount(sorted_experts, length=w_gate.shape[0]).astype(jnp.int32)
    h = jax.nn.silu(jax.lax.ragged_dot(xs, w_gate, sizes)) * jax.lax.ragged_dot(xs, w_up, sizes)
    return jax.lax.ragged_dot(h, w_down, sizes)


def block_rows(m: int, e: int) -> int:
    """Rows per block of `_blocked_experts` for m (token, expert) pairs over e experts: a power of
    two near m / 4E (partial blocks, ~E * b / 2 rows, stay ~1/8 of m), at least m / E up to 128
    (each block copies its expert's weights: small-moe's 3.5 MB experts want few blocks) and at
    most 1024: larger blocks pay off on large batches, smaller ones waste less padding on small
    ones (chosen by timing forward + backward on CPU)."""
    pow2 = lambda n: 2 ** int(math.log2(max(n, 1)))  # noqa: E731
    return int(min(1024, max(32, pow2(m // (4 * e)), min(128, pow2(m // e)))))


def _blocked_experts(x, routing: Routing, w_gate, w_up, w_down):
    """The CPU form of `dropless_experts`: pair (n, j) goes to row `rank within its expert` of
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


def small_batch_experts(x, routing, w_gate, w_up, w_down):
    """`dropless_experts` for a few tokens on CPU, by size:
      fewer (token, expert) pairs than half the experts: each pair's weights gathered and
        applied as a matvec (a gather copies, so reading all experts in place costs about as
        much as gathering half of them);
      more, with large experts: `_bucketed_experts`, every expert's weights read once, in place;
      more, with experts so small that op count, not memory, is the cost (tiny-moe): every
        token through every expert as one batched matmul per projection, then each token's K
        outputs picked and weighted.
    Once `dropless_experts` would compute fewer rows than every-expert, it takes over. The
    engine's per-layer decode runs tiny experts past the pairs branch as `dense_moe` instead
    (`MoE.decode`). Each branch was picked against the others by timing the decode at batch 1
    and 16 on CPU."""
    n, k = routing.experts.shape
    e, d, f = w_gate.shape
    if 2 * n * k < e:
        return _pair_experts(x, routing, w_gate, w_up, w_down), {}
    if n * e > n * k + 32 * min(e, n * k):
        return dropless_experts(x, routing, w_gate, w_up, w_down)
    if e * d * f > 1 << 18:
        return _bucketed_experts(x, routing, w_gate, w_up, w_down), {}
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


def _pair_experts(x, routing: Routing, w_gate, w_up, w_down):
    """x [N, D] through each (token, expert) pair's own gathered weights [N*K, D, F]."""
    n, k = routing.experts.shape
    flat = routing.experts.reshape(-1)
    xs = jnp.repeat(x, k, axis=0)
    h = jax.nn.silu(jnp.einsum("MD,MDF->MF", xs, w_gate[flat])) * jnp.einsum("MD,MDF->MF", xs, w_up[flat])
    y = jnp.einsum("MF,MFD->MD", h, w_down[flat]).reshape(n, k, -1)
    return jnp.einsum("NKD,NK->ND", y, routing.weights.astype(y.dtype))


def _bucketed_experts(x, routing: Routing, w_gate, w_up, w_down):
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


ExpertFn = Callable[..., tuple[jax.Array, dict]]
_EXPERT_FN: contextvars.ContextVar[ExpertFn] = contextvars.ContextVar("r1jax_expert_fn", default=dropless_experts)


def current_expert_fn() -> ExpertFn:
    return _EXPERT_FN.get()


@contextlib.contextmanager
def use_expert_fn(fn: ExpertFn):
    """Within this context MoE layers run their routed experts with `fn` (same signature as
    `dropless_experts`): how expert parallelism plugs in without the layer knowing the mesh."""
    token = _EXPERT_FN.set(fn)
    try:
        yield
    finally:
        _EXPERT_FN.reset(token)


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype, pdt = dtypes(cfg)
        init = normal(cfg.initializer_range)
        d, e, f = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
        self.gate = param(rngs, init, (d, e), ("embed", None), jnp.float32)
        if cfg.topk_method == "noaux_tc":
            self.bias = RoutingBias(zeros(rngs.params(), (e,), jnp.float32), axes=(None,))
        shapes = {"w_gate": ((e, d, f), ("experts", "embed", "mlp")), "w_up": ((e, d, f), ("experts", "embed", "mlp")),
                  "w_down": ((e, f, d), ("experts", "mlp", "embed"))}
        for name, (shape, axes) in shapes.items():
            w = param(rngs, init, shape, axes, pdt)
            if self.is_fp8:  # random weights quantized: a real model's come from its checkpoint
                q, scale_inv = fp8.quantize(w[...], self.fp8_block)
                setattr(self, name, FP8Weight(q, axes=axes))
                setattr(self, f"{name}_scale_inv", FP8Weight(scale_inv, axes=("experts", None, None)))
            else:
                setattr(self, name, w)
        if cfg.n_shared_experts:
            self.shared = MLP(cfg, f * cfg.n_shared_experts, rngs=rngs)

    @property
    def is_fp8(self) -> bool:
        return self.cfg.expert_dtype == "float8_e4m3fn"

    @property
    def fp8_block(self) -> tuple[int, int]:
        """The scale block over the stored [in, out] orientation: HF's [out, in] block reversed."""
        b_out, b_in = self.cfg.fp8_block_size
        return b_in, b_out

    def expert_weights(self, dtype=None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(w_gate, w_up [..., E, D, F], w_down [..., E, F, D]) as arrays of `dtype` (None:
        `param_dtype`), fp8 experts dequantized; leading dims: stacked layers. Call it inside the
        compiled function that uses them, so the dequantized copies stay transient."""
        dtype = dtype or dtypes(self.cfg)[1]
        if not self.is_fp8:
            return tuple(getattr(self, n)[...].astype(dtype) for n in EXPERT_WEIGHTS)
        return tuple(fp8.dequantize(getattr(self, n)[...], getattr(self, f"{n}_scale_inv")[...], self.fp8_block, dtype)
                     for n in EXPERT_WEIGHTS)

    def routing(self, x: jax.Array) -> Routing:
        """x [N,D] -> the routing of its tokens (`route`)."""
        logits = jnp.einsum("ND,DE->NE", x.astype(jnp.float32), self.gate[...])
        return route(logits, self.bias[...] if hasattr(self, "bias") else None, self.cfg)

    def decode_layout(self) -> dict:
        """{"experts": `dense_moe_weights` of the routed experts (at most 2^18 weights each) and
        the shared one} for `decode`; {} for larger experts. Leading dims: stacked layers."""
        if math.prod(self.w_gate.shape[-3:]) > 1 << 18:
            return {}
        shared = (self.shared.gate_proj[...], self.shared.up_proj[...], self.shared.down_proj[...]) \
            if self.cfg.n_shared_experts else None
        fn = dense_moe_weights if self.w_gate.ndim == 3 else jax.vmap(dense_moe_weights)
        return {"experts": fn(*self.expert_weights(), shared)}

    def decode(self, x: jax.Array, layout: dict | None = None) -> jax.Array:
        """x [B,T,D] -> y [B,T,D] (no stats) for the cached forms. In the single-device decode
        (`small_batch_experts` in use), with a dense layout (`decode_layout`) and past the
        gathered-pairs range, it runs as `dense_moe`: the router, then two dots for the routed
        and shared experts together."""
        b, t, d = x.shape
        cfg = self.cfg
        if (layout and "experts" in layout and _EXPERT_FN.get() is small_batch_experts
                and 2 * b * t * cfg.num_experts_per_tok >= cfg.n_routed_experts):
            flat = x.reshape(b * t, d)
            dense = layout["experts"]
            y = dense_moe(flat, self.routing(flat), dense["gate_up"], dense["down"], cfg.n_routed_experts,
                          cfg.moe_intermediate_size)
            return y.reshape(b, t, d)
        return self(x)[0]

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """x [B,T,D] -> (y [B,T,D], stats: loads [E], balance_loss [], plus the dispatch's metrics).
        mask [B,T] (None: all): the real tokens. Padding is still computed but never counts in the
        loads (which drive the routing-bias update) or the balance loss: GRPO batches are ~40%
        padding, all one token at one position, all routed alike."""
        b, t, d = x.shape
        dt = self.dtype
        flat = x.reshape(b * t, d)
        flat_mask = None if mask is None else mask.reshape(b * t)
        routing = self.routing(flat)
        if flat_mask is not None:
            routing = routing._replace(mask=flat_mask)
        y, metrics = _EXPERT_FN.get()(flat, routing, *self.expert_weights(dt))
        y = constrain(y.reshape(b, t, d), ("batch", "length", "embed"))
        if self.cfg.n_shared_experts:
            y = y + self.shared(x)
        stats = {
            "loads": expert_loads(routing.experts, self.cfg.n_routed_experts, flat_mask),
            "balance_loss": sequence_balance_loss(routing, b, self.cfg, flat_mask),
            **metrics,
        }
        return y, stats
