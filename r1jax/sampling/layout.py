"""What the compiled sampling steps take besides the cache: the weights (`Weights`) and where
they run (`Placement`).

On a single CPU device the engine keeps a per-layer copy of the stacks' weights
(`Weights.unstacked`): XLA:CPU copies whatever a dot reads from a slice of a stacked array, so a
scanned step would copy every layer's weights first. Each layer also carries its
`Block.decode_layout` arrays (W_kvb's halves heads-first for the absorbed dots; tiny experts,
with the shared one, as one dense matrix pair), and the stacks run one layer after another
instead of scanning (`r1jax.sampling.forward`). Its decode runs the routed experts of its few
tokens with `cpu_experts.small_batch_experts` and tiny ones as `dense_moe` (`Placement.model`).
The grouped-matmul kernel (`parallel.expert_kernel`) is the graphdef's unless
`Placement.expert_kernel` names one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from r1jax.config import ModelConfig
from r1jax.model.decoder import Decoder
from r1jax.model.cpu_experts import small_batch_experts
from r1jax.model.moe import ExpertFn, dropless_experts, set_expert_fn
from r1jax.parallel import rules as rules_lib
from r1jax.parallel.backend import on_cpu
from r1jax.parallel.rules import MeshAxes
from r1jax.sampling.cache import Cache, cache_shardings

STACKS = ("dense_layers", "moe_layers")  # the decoder's scanned stacks, in forward order


@dataclasses.dataclass(frozen=True)
class Weights:
    """A decoder as (graphdef, params, extra): what the compiled functions take. Built from a
    `Decoder` or a train state without copying any array."""

    graphdef: Any
    params: Any
    extra: Any
    layers: Any = None  # {stack: ((layer state, `Block.decode_layout`), ...)} of `unstacked()`; None: scan

    @classmethod
    def of(cls, model_or_state) -> "Weights":
        if isinstance(model_or_state, Weights):
            return model_or_state
        if isinstance(model_or_state, nnx.Module):
            return cls(*nnx.split(model_or_state, nnx.Param, ...))
        if isinstance(model_or_state, (tuple, list)):
            if len(model_or_state) == 3:
                return cls(*model_or_state)
            if len(model_or_state) == 2:  # (graphdef, TrainState)
                graphdef, state = model_or_state
                return cls(graphdef, state.params, state.extra)
        raise TypeError("expected a Decoder, (graphdef, params, extra) or (graphdef, TrainState)")

    @property
    def cfg(self) -> ModelConfig:
        return nnx.merge(self.graphdef, self.params, self.extra).cfg

    def model(self) -> Decoder:
        return nnx.merge(self.graphdef, self.params, self.extra)

    def unstacked(self) -> "Weights":
        """These weights plus a copy of every layer of the stacks as arrays of their own, for the
        single-device CPU forward (`forward_cached` loops over them instead of scanning). XLA:CPU
        copies whatever a dot reads from a slice of a stacked array, so a scanned decode step
        copies every layer's weights first; with arrays of their own it reads them in place.
        Costs a second copy of the stacks' weights."""
        return dataclasses.replace(self, layers=_unstack(self.graphdef, self.params, self.extra))

    @functools.cached_property
    def packed(self) -> tuple["WeightsKey", tuple[jax.Array, ...]]:
        """(key, leaves): these weights as the compiled steps take them, built once per `Weights`.
        A jit call hashes its static arguments and flattens its array arguments every time; for
        a graphdef and nnx States that took ~130 µs a call on CPU (more than a decode step of a
        small model), for a `WeightsKey` and a flat tuple ~10 µs. `unpack` inverts it."""
        leaves, treedef = jax.tree.flatten((self.params, self.extra, self.layers))
        return WeightsKey(self.graphdef, treedef), tuple(leaves)

    @classmethod
    def unpack(cls, key: "WeightsKey", leaves) -> "Weights":
        params, extra, layers = jax.tree.unflatten(key.treedef, leaves)
        return cls(key.graphdef, params, extra, layers)


class WeightsKey:
    """The static half of `Weights.packed`: graphdef and tree structure, hashed once. Equality
    checks identity first, so a jit cache hit with the same key costs no graphdef comparison."""

    __slots__ = ("_hash", "graphdef", "treedef")

    def __init__(self, graphdef, treedef):
        self.graphdef, self.treedef = graphdef, treedef
        self._hash = hash((graphdef, treedef))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return self is other or (isinstance(other, WeightsKey) and self._hash == other._hash
                                 and self.treedef == other.treedef and self.graphdef == other.graphdef)


@jax.jit
def _unstack_states(stacks: dict) -> dict:
    return {k: tuple(jax.tree.map(lambda a, i=i: a[i], st) for i in range(jax.tree.leaves(st)[0].shape[0]))
            for k, st in stacks.items()}


def _unstack(graphdef, params, extra) -> dict:
    """{stack: ((layer state, `Block.decode_layout` arrays), ...)} for `Weights.layers`."""
    model = nnx.merge(graphdef, params, extra)
    stacks = {k: getattr(model, k) for k in STACKS if getattr(model, k) is not None}
    return _unstack_states({k: (nnx.state(b), b.decode_layout()) for k, b in stacks.items()})


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where the compiled functions run: a mesh and rules table (activations), the expert
    dispatch. Hashable: a static argument of the compiled functions."""

    mesh: Mesh | None = None
    rules: tuple[tuple[str, MeshAxes], ...] = ()
    capacity_factor: float | None = None
    expert_kernel: str | None = None  # `parallel.expert_kernel`; None: the graphdef's MoE layers' own

    @contextlib.contextmanager
    def active(self):
        """The activation sharding rules of the mesh (none without one), for tracing."""
        if self.mesh is None:
            yield
            return
        with rules_lib.use_rules(self.mesh, dict(self.rules)):
            yield

    def expert_fn(self, decode: bool = False) -> tuple[ExpertFn, bool]:
        """(the routed experts' kernel, `MoE.dense_decode`) of these compiled functions: the
        expert-parallel dispatch on a mesh; on a single CPU device the decode's small-batch
        kernels (`r1jax.model.cpu_experts`); else `dropless_experts`."""
        if self.mesh is not None:
            from r1jax.parallel.expert import make_expert_fn

            mode = "dropless" if self.capacity_factor is None else "capacity"
            return make_expert_fn(self.mesh, dict(self.rules), mode=mode, capacity_factor=self.capacity_factor), False
        if decode and on_cpu():
            return small_batch_experts, True
        return dropless_experts, False

    def model(self, graphdef, params, extra, *, decode: bool = False) -> Decoder:
        """The decoder, merged inside a compiled function, with its MoE layers set to
        `expert_fn(decode)` (whatever expert fn the graphdef came with, e.g. a train step's) and
        to `expert_kernel` (if None, the graphdef's kernel stays)."""
        fn, dense = self.expert_fn(decode)
        return set_expert_fn(nnx.merge(graphdef, params, extra), fn, dense_decode=dense, kernel=self.expert_kernel)

    def constrain_cache(self, cache: Cache, cfg: ModelConfig) -> Cache:
        """Keeps the cache in its own layout from step to step (no resharding, no recompiles)."""
        if self.mesh is None:
            return cache
        sh = cache_shardings(cfg, cache.slots, cache.max_len, self.mesh, dict(self.rules), "mtp" in cache.stacks)
        return jax.lax.with_sharding_constraint(cache, sh)
