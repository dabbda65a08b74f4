"""DeepSeekMoE: shared experts plus routed SwiGLU experts, aux-loss-free balancing (V3).

Letters: B batch, T length, N tokens (B*T), D width, E routed experts, K experts per token,
F expert hidden, G expert groups.

Routing (spec §3), `route`:
  V3: s = sigmoid(x W_g); choice by s + b (b: `RoutingBias`, no gradient), group-limited: keep the
      `topk_group` groups with the best top-2 sums, then top-K experts inside them;
      weights w = s[chosen] (/ Σ if norm_topk_prob) · routed_scaling_factor.
  V2: s = softmax(x W_g); greedy top-K (or group-limited by group max); no bias.
Expert compute is dropless (`dropless_experts`): each expert's tokens contiguous, one grouped matmul
per projection (`r1jax.model.grouped_matmul`: megablox on TPU, `ragged_dot` on GPU); on CPU the
speed paths of `r1jax.model.cpu_experts`.

How a MoE layer runs its experts is static, set with `set_expert_fn` on a model before it is split
for a compiled function, so the graphdef carries it: `MoE.expert_fn` (default `dropless_experts`),
expert parallelism's dispatch (`r1jax.parallel.expert.make_expert_fn`) for a mesh,
`cpu_experts.small_batch_experts` (and `MoE.dense_decode`) for the single-device CPU decode; and
`MoE.expert_kernel`, the grouped-matmul kernel (`parallel.expert_kernel`, a string), which the
layer passes to its expert fn on every call.

FP8 experts (`ModelConfig.expert_dtype: float8_e4m3fn`, sampling only): w_gate / w_up / w_down
are `FP8Weight`s in r1jax's [in, out] orientation (each expert's HF weight [out, in] transposed),
each with a float32 `<name>_scale_inv` [E, ceil(in/b_in), ceil(out/b_out)], HF's scale grid
transposed the same way, (b_out, b_in) = `fp8_block_size`. `MoE.expert_weights` dequantizes them
where the layer runs, so inside a scanned, compiled step only one layer's experts exist in the
compute dtype at a time.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from r1jax.config import ModelConfig
from r1jax.model import fp8
from r1jax.model.cpu_experts import blocked_experts, dense_moe, dense_moe_weights
from r1jax.model.grouped_matmul import grouped_swiglu, resolve_expert_kernel
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


def dropless_experts(x, routing: Routing, w_gate, w_up, w_down, *, kernel: str = "auto") -> tuple[jax.Array, dict]:
    """x [N, D] through the chosen experts, nothing dropped. w_gate/w_up [E, D, F], w_down [E, F, D].

    Each expert's (token, expert) pairs are made contiguous and run as one grouped matmul per
    projection: sorted by expert into `grouped_swiglu` with `kernel` (`resolve_expert_kernel`:
    "auto" is megablox on TPU, ragged_dot on GPU); or, kernel "blocked" (CPU's "auto", where XLA's
    ragged_dot is a slow generic loop), scattered into blocks padded to whole tiles
    (`cpu_experts.blocked_experts`).
    """
    kernel = resolve_expert_kernel(kernel)
    if kernel == "blocked":
        return blocked_experts(x, routing, w_gate, w_up, w_down), {}
    n, k = routing.experts.shape
    flat = routing.experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=w_gate.shape[0]).astype(jnp.int32)
    ys = grouped_swiglu(x[order // k], sizes, w_gate, w_up, w_down, kernel)  # [N*K, D] in expert order
    y = ys[jnp.argsort(order)].reshape(n, k, -1)
    return jnp.einsum("NKD,NK->ND", y, routing.weights.astype(y.dtype)), {}


ExpertFn = Callable[..., tuple[jax.Array, dict]]


def set_expert_fn(model: nnx.Module, fn: ExpertFn, *, dense_decode: bool = False,
                  kernel: str | None = None) -> nnx.Module:
    """Every MoE layer of `model` (the scanned stacks' and the MTP blocks' too) runs its routed
    experts with `fn` (same signature as `dropless_experts`, `kernel` keyword included);
    dense_decode: `MoE.decode` may run tiny experts as `dense_moe` (the single-device CPU decode);
    kernel: `MoE.expert_kernel`, the grouped-matmul kernel passed to `fn` (`parallel.expert_kernel`;
    None: each layer keeps its own). Static attributes: call it before `nnx.split` (or on the model
    merged inside the compiled function) and the graphdef carries the choice, fixed per compiled
    function. Returns `model`."""
    if kernel is not None:
        resolve_expert_kernel(kernel)  # an unknown name fails here, not at trace time
    for _, m in nnx.iter_modules(model):
        if isinstance(m, MoE):
            m.expert_fn, m.dense_decode = fn, dense_decode
            m.expert_kernel = m.expert_kernel if kernel is None else kernel
    return model


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype, pdt = dtypes(cfg)
        self.expert_fn: ExpertFn = dropless_experts  # static: `set_expert_fn`
        self.dense_decode = False  # static: `set_expert_fn`
        self.expert_kernel = "auto"  # static: `set_expert_fn`
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
        """x [B,T,D] -> y [B,T,D] (no stats) for the cached forms. In the single-device CPU decode
        (`dense_decode`, set with `small_batch_experts`), with a dense layout (`decode_layout`) and past the
        gathered-pairs range, it runs as `dense_moe`: the router, then two dots for the routed
        and shared experts together."""
        b, t, d = x.shape
        cfg = self.cfg
        if (self.dense_decode and layout and "experts" in layout
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
        y, metrics = self.expert_fn(flat, routing, *self.expert_weights(dt), kernel=self.expert_kernel)
        y = constrain(y.reshape(b, t, d), ("batch", "length", "embed"))
        if self.cfg.n_shared_experts:
            y = y + self.shared(x)
        stats = {
            "loads": expert_loads(routing.experts, self.cfg.n_routed_experts, flat_mask),
            "balance_loss": sequence_balance_loss(routing, b, self.cfg, flat_mask),
            **metrics,
        }
        return y, stats
