"""The one table from logical axis names to mesh axes.

Every parameter is created with logical names (`r1jax.model.layers.param`), and the model marks
key activations with `constrain(x, names)`. This table alone decides where they go on the mesh,
so changing the parallelism of a run is a config change (mesh sizes, `fsdp`), never a code change.

Logical names (letters as in the einsums):
  batch (B), length (T/S), embed (D), vocab (V), heads (H), kv_heads, head_dim (K),
  q_lora, kv_lora (L), mlp (F), experts (E), layers, norm.

Why a context (`use_rules`) and not an argument: activation sharding constraints are ambient
placement hints, not part of what a layer computes; a model traced without them computes the same
values. So, like JAX's own `jax.sharding.use_mesh` and flax's `nnx.logical_axis_rules`, the
(mesh, table) pair is set around tracing a compiled function, and `constrain` reads it there
(outside any: no constraint). Threading it through every module call would put the mesh into
the model code for no change in what it computes. It is read only while tracing, so each
compiled function sees the one table it was traced under. What a layer computes (which expert
kernel) is explicit instead: a static attribute of the model (`r1jax.model.moe.set_expert_fn`).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None

# Batch is split over `data` and `expert`: expert devices do data-parallel work outside the MoE.
BASE_RULES: dict[str, MeshAxes] = {
    "batch": ("data", "expert"),
    "length": None,
    "embed": None,
    "vocab": "model",
    "heads": "model",
    "kv_heads": "model",
    "head_dim": None,
    "q_lora": None,
    "kv_lora": None,
    "mlp": "model",
    "experts": "expert",
    "layers": None,
    "norm": None,
}


def rules_for(fsdp: bool = False) -> dict[str, MeshAxes]:
    """The table for a run: with fsdp, weights' `embed` dimension is split over `data` and `expert`
    (every device that is data-parallel outside the MoE); expert weights keep `expert` for E."""
    rules = dict(BASE_RULES)
    if fsdp:
        # Dense weights over every data-parallel device; the latent ranks too, so MLA's up
        # projections (wq_b [Q,H,K], wkv_b [L,H,N]) are not replicated when `model` is small.
        for name in ("embed", "q_lora", "kv_lora"):
            rules[name] = ("data", "expert")
    return rules


_ACTIVE: contextvars.ContextVar[tuple[jax.sharding.Mesh, dict] | None] = contextvars.ContextVar(
    "r1jax_sharding_rules", default=None
)


@contextlib.contextmanager
def use_rules(mesh: jax.sharding.Mesh, rules: dict[str, MeshAxes]):
    """Within this context `constrain` places activations on `mesh` by `rules`."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> tuple[jax.sharding.Mesh, dict[str, MeshAxes]] | None:
    """The (mesh, rules) of the enclosing `use_rules`, or None: for kernels that must run per
    device in a `shard_map` (a Pallas call cannot be split by the SPMD partitioner)."""
    return _ACTIVE.get()


def to_pspec(names: Sequence[str | None], rules: dict[str, MeshAxes], mesh_axes: Sequence[str] = ()) -> PartitionSpec:
    """Logical names -> PartitionSpec. A mesh axis is used at most once (first name wins) and
    axes of size 1 or absent from the mesh are dropped."""
    used: set[str] = set()
    out = []
    for name in names:
        target = rules.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and (not mesh_axes or a in mesh_axes))
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside `use_rules`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = to_pspec(names, rules, mesh.axis_names)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
