"""The routed experts' grouped matmul (`r1jax.model.grouped_matmul`): ragged_dot and megablox (Pallas
interpret mode on CPU) against a per-group NumPy reference, forward and gradients, and
`dropless_experts` with each kernel against the blocked CPU path. Shapes are tiny and awkward on
purpose: a group with no rows, M no tile multiple, K and N no multiple of 128, and rows past the
groups' sum."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from r1jax.config import ModelConfig
from r1jax.model.cpu_experts import blocked_experts
from r1jax.model.grouped_matmul import grouped_matmul, megablox_tiling, resolve_expert_kernel
from r1jax.model.moe import MoE, Routing, dropless_experts, set_expert_fn

KERNELS = ("ragged_dot", "megablox")
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _numpy_grouped(x, w, sizes, ct):
    """Per group g, rows x_g = the next sizes[g] rows: y_g = x_g w_g and, for the loss sum(y * ct),
    dx_g = ct_g w_g^T, dw_g = x_g^T ct_g. Rows past sum(sizes) belong to no group: zero."""
    x, w, ct = (np.asarray(a, np.float64) for a in (x, w, ct))
    y, dx, dw = np.zeros((x.shape[0], w.shape[2])), np.zeros_like(x), np.zeros_like(w)
    start = 0
    for g, size in enumerate(sizes):
        rows = slice(start, start + size)
        y[rows], dx[rows], dw[g] = x[rows] @ w[g], ct[rows] @ w[g].T, x[rows].T @ ct[rows]
        start += size
    return y, dx, dw


@pytest.mark.parametrize("kernel", KERNELS)
def test_grouped_matmul_matches_numpy(kernel):
    m, k, n = 21, 8, 12
    sizes = [5, 0, 9, 4]  # group 1 is empty; 18 rows of 21 are grouped, the last 3 none
    rng = np.random.default_rng(0)
    x, ct = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((m, n)).astype(np.float32)
    w = rng.standard_normal((len(sizes), k, n)).astype(np.float32)

    @jax.jit
    def run(x, w):
        y, vjp = jax.vjp(lambda x, w: grouped_matmul(x, w, jnp.asarray(sizes, jnp.int32), kernel), x, w)
        return (y, *vjp(ct))

    chex.assert_trees_all_close(run(x, w), _numpy_grouped(x, w, sizes, ct), **TOL)


def test_megablox_tiling():
    assert megablox_tiling(21, 128, 128) == (32, 128, 128)  # small M: one tile, rounded up to 16 rows
    assert megablox_tiling(5000, 7168, 2048) == (128, 512, 512)
    assert megablox_tiling(5000, 2048, 1408) == (128, 128, 128)  # 1408 = 11 * 128: one tile fits both


def test_resolve_expert_kernel():
    assert [resolve_expert_kernel("auto", p) for p in ("tpu", "gpu", "cpu")] == ["megablox", "ragged_dot", "blocked"]
    assert resolve_expert_kernel() == "blocked"  # this process: CPU
    assert [resolve_expert_kernel(k) for k in KERNELS] == list(KERNELS)  # explicit names pass through
    with pytest.raises(ValueError, match="expert kernel"):
        resolve_expert_kernel("cutlass")


def _experts_case(seed=0):
    """6 tokens, 2 of 4 experts each, expert 3 never chosen; x, routing weights, three weights."""
    n, d, e, f = 6, 8, 4, 12
    rng = np.random.default_rng(seed)
    chosen = np.stack([rng.choice(3, 2, replace=False) for _ in range(n)]).astype(np.int32)
    f32 = lambda *s: (rng.standard_normal(s) * 0.5).astype(np.float32)  # noqa: E731
    args = (f32(n, d), rng.random((n, 2)).astype(np.float32), f32(e, d, f), f32(e, d, f), f32(e, f, d))
    return jnp.asarray(chosen), args, f32(n, d)


@pytest.mark.parametrize("kernel", KERNELS)
def test_dropless_experts_kernel_matches_blocked(kernel):
    """`dropless_experts` sorted into the grouped matmul equals the blocked CPU path: output and
    gradients wrt x, the routing weights and all three expert weights."""
    chosen, args, ct = _experts_case()

    def value_and_grads(fn):
        def run(x, weights, *ws):
            y, vjp = jax.vjp(lambda x, weights, *ws: fn(x, Routing(weights, chosen, None), *ws), x, weights, *ws)
            return y, vjp(ct)

        return jax.jit(run)(*args)

    got = value_and_grads(lambda *a: dropless_experts(*a, kernel=kernel)[0])
    chex.assert_trees_all_close(got, value_and_grads(blocked_experts), **TOL)
    assert not np.any(got[1][2][3]) and not np.any(got[1][4][3])  # expert 3 got no tokens: no gradient


def _primitives(jaxpr) -> set[str]:
    out = set()
    for eqn in jaxpr.eqns:
        out.add(eqn.primitive.name)
        for sub in jax.core.jaxprs_in_params(eqn.params):
            out |= _primitives(sub)
    return out


def test_moe_layer_runs_its_static_kernel():
    """`set_expert_fn(kernel=)` is a static string of the layer, equal graphdefs for equal kernels
    (no recompiles), and it decides the kernel traced: "auto" on CPU is the blocked path."""
    cfg = ModelConfig(vocab_size=64, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                      n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, n_shared_experts=0,
                      n_group=1, topk_group=1)
    layer = nnx.eval_shape(lambda: MoE(cfg, rngs=nnx.Rngs(0)))
    x = jax.ShapeDtypeStruct((2, 3, 8), jnp.float32)
    traced = {}
    for kernel in ("auto", "ragged_dot", "megablox"):
        graphdef, state = nnx.split(set_expert_fn(layer, dropless_experts, kernel=kernel))
        assert graphdef == nnx.graphdef(set_expert_fn(layer, dropless_experts, kernel=kernel))
        forward = lambda s, x, graphdef=graphdef: nnx.merge(graphdef, s)(x)[0]  # noqa: E731
        traced[kernel] = _primitives(jax.make_jaxpr(forward)(state, x).jaxpr)
    assert not {"ragged_dot_general", "pallas_call"} & traced["auto"]
    assert "ragged_dot_general" in traced["ragged_dot"] and "pallas_call" not in traced["ragged_dot"]
    assert "pallas_call" in traced["megablox"]
    with pytest.raises(ValueError, match="expert kernel"):
        set_expert_fn(layer, dropless_experts, kernel="cutlass")
