"""Shardings of trees and batches by the logical-axis table (`r1jax.parallel.rules`).

`spec_for` is a table's PartitionSpec less any mesh axis that does not divide its dimension, so
a small model (or a tiny test mesh) still places on a large mesh; `shardings` applies it to every
`nnx.Variable` of a tree by its `axes` metadata. Used by training (the state's layout), checkpoint
restores and conversion (where each host reads only its shards), and sampling (the weights).
"""

from __future__ import annotations

import math

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from r1jax.parallel.rules import MeshAxes, to_pspec


def spec_for(shape: tuple[int, ...], names, rules: dict[str, MeshAxes], mesh: Mesh) -> PartitionSpec:
    """The table's spec, less any mesh axis that does not divide its dimension."""
    spec = to_pspec(names, rules, mesh.axis_names)
    fixed = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        group = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        keep = []
        for a in group:
            if dim % (mesh.shape[a] * max(1, math.prod(mesh.shape[k] for k in keep))) == 0:
                keep.append(a)
        fixed.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return PartitionSpec(*fixed)


def shardings(tree, mesh: Mesh, rules: dict[str, MeshAxes]):
    """NamedSharding for every leaf: Variables by their `axes` metadata through the rules table,
    plain arrays (step, optimizer counters) replicated."""

    def one(x):
        if isinstance(x, nnx.Variable):
            names = x.get_metadata().get("axes", (None,) * len(x.shape))
            return x.replace(NamedSharding(mesh, spec_for(tuple(x.shape), names, rules, mesh)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_shardings(batch_keys, mesh: Mesh, rules: dict[str, MeshAxes]) -> dict[str, NamedSharding]:
    """One sharding for every batch array: [B, T] split by the table's `batch` and `length`. The
    spec names the leading two dims, so a [B, T, ...] key (distillation's teacher top-k [B, T, K])
    is split the same way and keeps its trailing dims whole."""
    spec = to_pspec(("batch", "length"), rules, mesh.axis_names)
    return {k: NamedSharding(mesh, spec) for k in batch_keys}
