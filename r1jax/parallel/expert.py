"""Expert parallelism: routed tokens travel to the device that owns their expert and back.

`make_expert_fn(mesh, rules, mode=...)` returns a drop-in for `r1jax.model.moe.dropless_experts`
(plug it in with `r1jax.model.moe.set_expert_fn`; the layer passes it its `kernel`). It is called
on global arrays and runs one `jax.shard_map` over the whole mesh, with every spec read from the
rules table:
  tokens N   split over the `batch` axes (data, expert);
  experts E  split over the `experts` axis (expert): each device holds E_l = E / ep experts;
  hidden F   split over the `mlp` axis (model): outputs are partial sums, `psum`med over model;
  width D    of the weights split over `data` under fsdp: all-gathered inside, just before use.

Letters: N tokens, K experts per token, D width, E experts, F expert hidden, S source shard on
the expert axis, C slots per expert per source shard. Inside the map N, F and the experts of the
weights (E_l = E / ep) are the local slices.

Modes:
  capacity  every source shard gives each expert C = ceil(capacity_factor * N * K / E) slots,
            filled by (token, k) pairs in token order, the real tokens' (`Routing.mask`) before
            padding's; pairs past C are dropped (they add zero).
            Buffers [E, C, D] go to the owners with `all_to_all`, the owners run their experts
            as batched einsums, and `all_to_all` brings the rows back. Static shapes everywhere.
  dropless  pairs sorted by expert travel with `ragged_all_to_all` (sizes exchanged first with
            `all_to_all`), owners run one grouped matmul per projection (`grouped_swiglu`: the
            `kernel`, with CPU's "blocked" as ragged_dot), and the reverse path brings them back.
            XLA:CPU has no ragged all-to-all, so on CPU this falls back to capacity mode with
            C = N (a token picks an expert at most once, so nothing can drop), warning once.
With an expert axis of size 1 no tokens move: both modes run `dropless_experts` locally (with the
`kernel`). Capacity mode's batched einsums need no grouped matmul and ignore it.

Metric (every mode): `dropped_fraction`, dropped real pairs / real pairs over the global batch.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from r1jax.model.grouped_matmul import grouped_swiglu, resolve_expert_kernel
from r1jax.model.moe import ExpertFn, Routing, dropless_experts
from r1jax.parallel.backend import backend, on_cpu
from r1jax.parallel.rules import MeshAxes, to_pspec

_warned_cpu_fallback = False
# Indirection so tests can stand in an emulation (XLA:CPU has no ragged all-to-all).
_ragged_all_to_all = jax.lax.ragged_all_to_all


def _ragged_supported() -> bool:
    return not on_cpu()


def expert_capacity(n_local: int, k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert per source shard: ceil(factor * N * K / E), at most N (more never fill)."""
    return max(1, min(n_local, math.ceil(capacity_factor * n_local * k / num_experts)))


def dropless_fallback_capacity(n_local: int) -> int:
    """Capacity that cannot drop: a token picks each expert at most once, so no expert ever
    receives more than N pairs from one source shard."""
    return n_local


def _axes(spec_entry: MeshAxes) -> tuple[str, ...]:
    return () if spec_entry is None else (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


def _exclusive_cumsum(x: jax.Array) -> jax.Array:
    return jnp.cumsum(x) - x


def _swiglu_einsum(x, w_gate, w_up, w_down):
    """x [S, E_l, C, D] through the local experts [E_l, D, F] / [E_l, F, D] -> partial [S, E_l, C, D]."""
    h = jax.nn.silu(jnp.einsum("SECD,EDF->SECF", x, w_gate)) * jnp.einsum("SECD,EDF->SECF", x, w_up)
    return jnp.einsum("SECF,EFD->SECD", h, w_down)


def _capacity_experts(x, experts, weights, real, w_gate, w_up, w_down, *, capacity: int, axis, ep: int):
    """One shard's tokens through capacity-limited expert buffers; real [N] bool: tokens that
    take slots before padding does -> (y partial over F, dropped real pairs)."""
    n, k = experts.shape
    d, e = x.shape[-1], ep * w_gate.shape[0]
    flat = experts.reshape(-1)  # [N*K] in token order, then k order
    padding = ~jnp.repeat(real, k)
    with jax.named_scope("permute"):
        # By expert, real pairs before padding (GRPO batches are ~40% padding), then token order.
        order = jnp.argsort(flat * 2 + padding, stable=True)
        sizes = jnp.bincount(flat, length=e)
        starts = _exclusive_cumsum(sizes)
        # Slot (e, c) holds the c-th pair routed to e (in token order), if there is one.
        slot_pair = jnp.minimum(starts[:, None] + jnp.arange(capacity), n * k - 1)  # [E, C]
        slot_used = jnp.arange(capacity) < sizes[:, None]
        pair = order[slot_pair]
        buf = jnp.where(slot_used[..., None], x[pair // k], 0).astype(x.dtype)  # [E, C, D]
        # Each pair's slot: its rank among the pairs of its expert.
        pos = jnp.zeros_like(flat).at[order].set(jnp.arange(n * k) - starts[flat[order]])
        keep = pos < capacity
    with jax.named_scope("dispatch"):
        recv = jax.lax.all_to_all(buf, axis, 0, 0, tiled=True)  # [S*E_l, C, D]: block s from source s
        out = _swiglu_einsum(recv.reshape(ep, -1, capacity, d), w_gate, w_up, w_down)
        out = jax.lax.all_to_all(out.reshape(e, capacity, d), axis, 0, 0, tiled=True)  # [E, C, D], ours
    with jax.named_scope("unpermute"):
        rows = out.reshape(e * capacity, d)[flat * capacity + jnp.minimum(pos, capacity - 1)]
        y = jnp.where(keep[:, None], rows, 0).reshape(n, k, d)
        y = jnp.einsum("NKD,NK->ND", y, weights.astype(y.dtype))
    return y, jnp.sum(~keep & ~padding)


def _ragged_experts(x, experts, weights, w_gate, w_up, w_down, *, axis, ep: int, kernel: str) -> jax.Array:
    """Dropless: pairs sorted by expert go to their owners with `ragged_all_to_all`.

    Sizes and offsets are [E] vectors, one slice per (owner, local expert), so an owner's
    receive buffer comes out grouped by local expert (then by source) and the grouped matmul
    (`kernel`) runs on it as is; rows past the received ones belong to no expert and stay zero.
    The buffer holds the worst case, S * N * min(K, E_l) rows.
    """
    kernel = resolve_expert_kernel(kernel)
    kernel = "ragged_dot" if kernel == "blocked" else kernel  # blocked needs the routing, not a buffer
    n, k = experts.shape
    d, n_local_experts = x.shape[-1], w_gate.shape[0]
    flat = experts.reshape(-1)
    a2a = lambda v: jax.lax.all_to_all(v, axis, 0, 0, tiled=True)  # noqa: E731
    with jax.named_scope("permute"):
        order = jnp.argsort(flat, stable=True)
        xs = x[order // k]  # [N*K, D] sorted by expert, so grouped by owner
        send_sizes = jnp.bincount(flat, length=ep * n_local_experts).astype(jnp.int32)  # [E]
        input_offsets = _exclusive_cumsum(send_sizes)
        recv_sizes = a2a(send_sizes)  # [S*E_l]: rows source s sends for each of my experts
        by_expert = recv_sizes.reshape(ep, n_local_experts).T  # [E_l, S]
        recv_offsets = _exclusive_cumsum(by_expert.reshape(-1)).reshape(n_local_experts, ep).T.reshape(-1)
        output_offsets = a2a(recv_offsets)  # where my slice for each expert lands at its owner
        group_sizes = by_expert.sum(1)  # [E_l]
    with jax.named_scope("dispatch"):
        rows = ep * n * min(k, n_local_experts)
        buf = _ragged_all_to_all(
            xs, jnp.zeros_like(xs, shape=(rows, d)), input_offsets, send_sizes, output_offsets, recv_sizes,
            axis_name=axis,
        )
        out = grouped_swiglu(buf, group_sizes, w_gate, w_up, w_down, kernel)  # [rows, D] partial over F
        # Reverse path: each slice goes back to where its source had it.
        ys = _ragged_all_to_all(
            out, jnp.zeros_like(xs), recv_offsets, recv_sizes, a2a(input_offsets), send_sizes, axis_name=axis
        )
    y = ys[jnp.argsort(order)].reshape(n, k, d)  # unpermute
    return jnp.einsum("NKD,NK->ND", y, weights.astype(y.dtype))


def make_expert_fn(mesh: jax.sharding.Mesh, rules: dict[str, MeshAxes], *, mode: str = "dropless",
                   capacity_factor: float | None = None) -> ExpertFn:
    """An `ExpertFn` (signature of `dropless_experts`) running expert parallelism on `mesh`."""
    global _warned_cpu_fallback
    if mode not in ("dropless", "capacity"):
        raise ValueError(f"mode must be 'dropless' or 'capacity', got {mode!r}")
    if mode == "capacity" and capacity_factor is None:
        raise ValueError("capacity mode needs a capacity_factor")
    names = mesh.axis_names
    tok_spec = P(to_pspec(("batch",), rules, names)[0], None)  # x [N, D], routing [N, K]
    batch_axes = _axes(tok_spec[0])
    up_spec = to_pspec(("experts", "embed", "mlp"), rules, names)  # w_gate, w_up [E, D, F]
    down_spec = to_pspec(("experts", "mlp", "embed"), rules, names)  # w_down [E, F, D]
    expert_axes, model_axes = _axes(up_spec[0]), _axes(up_spec[2])
    fsdp_up, fsdp_down = _axes(up_spec[1]), _axes(down_spec[2])
    ep = math.prod(mesh.shape[a] for a in expert_axes)
    if ep > 1 and not set(expert_axes) <= set(batch_axes):
        raise ValueError(f"tokens must be split over the expert axes {expert_axes} (rules['batch'])")
    axis = expert_axes[0] if len(expert_axes) == 1 else expert_axes
    use_ragged = mode == "dropless" and _ragged_supported()
    if mode == "dropless" and not use_ragged and ep > 1 and not _warned_cpu_fallback:
        logging.warning("expert dispatch: no ragged_all_to_all on %s; 'dropless' runs as capacity mode with "
                        "capacity = local tokens (nothing drops, E/K x the buffer)", backend())
        _warned_cpu_fallback = True

    def local(x, expert_ids, weights, real, w_gate, w_up, w_down, *, kernel):
        if fsdp_up:  # fsdp: the weights' D is split over data; gather it for this layer only
            w_gate, w_up = (jax.lax.all_gather(w, fsdp_up, axis=1, tiled=True) for w in (w_gate, w_up))
        if fsdp_down:
            w_down = jax.lax.all_gather(w_down, fsdp_down, axis=2, tiled=True)
        n, k = expert_ids.shape
        if ep == 1:
            y, _ = dropless_experts(x, Routing(weights, expert_ids, None), w_gate, w_up, w_down, kernel=kernel)
            dropped = None
        elif use_ragged:
            y = _ragged_experts(x, expert_ids, weights, w_gate, w_up, w_down, axis=axis, ep=ep, kernel=kernel)
            dropped = None
        else:
            e = ep * w_gate.shape[0]
            c = (expert_capacity(n, k, e, capacity_factor) if mode == "capacity" else dropless_fallback_capacity(n))
            y, dropped = _capacity_experts(x, expert_ids, weights, real, w_gate, w_up, w_down, capacity=c, axis=axis,
                                           ep=ep)
        if model_axes:
            y = jax.lax.psum(y, model_axes)  # F was split: every model shard holds a partial sum
        if dropped is None:
            return y, jnp.zeros((), jnp.float32)
        # Tokens are split over the batch axes only (replicated over the rest): summing over them
        # counts every pair of the global batch exactly once.
        real_pairs = jax.lax.psum(jnp.sum(real) * k, batch_axes)
        return y, jax.lax.psum(dropped, batch_axes).astype(jnp.float32) / jnp.maximum(real_pairs, 1)

    def expert_fn(x, routing: Routing, w_gate, w_up, w_down, *, kernel: str = "auto") -> tuple[jax.Array, dict]:
        mapped = jax.shard_map(
            functools.partial(local, kernel=kernel), mesh=mesh,
            in_specs=(tok_spec, tok_spec, tok_spec, P(tok_spec[0]), up_spec, up_spec, down_spec),
            out_specs=(tok_spec, P()),
            # megablox's pallas_call declares its output with no `manual_axis_type`, which
            # check_vma refuses (JAX 0.10.2); unchecked, the transpose psums what it must.
            check_vma=resolve_expert_kernel(kernel) != "megablox",
        )
        real = jnp.ones(x.shape[:1], bool) if routing.mask is None else routing.mask
        y, dropped_fraction = mapped(x, routing.experts, routing.weights, real, w_gate, w_up, w_down)
        return y, {"dropped_fraction": dropped_fraction}

    return expert_fn
