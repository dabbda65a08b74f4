"""Expert parallelism (`r1jax.parallel.expert`) against single-device `dropless_experts` and a
NumPy reference of the capacity rule, on 8 emulated CPU devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding

from r1jax.config import ModelConfig
from r1jax.model import moe as moe_lib
from r1jax.parallel import expert
from r1jax.parallel.rules import rules_for, to_pspec, use_rules

N, D, E, F, K = 64, 8, 16, 8, 4
CFG = ModelConfig(
    vocab_size=64, hidden_size=D, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
    n_routed_experts=E, num_experts_per_tok=K, moe_intermediate_size=F, n_shared_experts=1,
    n_group=4, topk_group=2, routed_scaling_factor=2.5,
)
MESHES = [(1, 8, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2)]


def _mesh(shape):
    return jax.make_mesh(shape, ("data", "expert", "model"), axis_types=(AxisType.Auto,) * 3)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    f32 = lambda *s: jnp.asarray(rng.normal(0, 0.5, s), jnp.float32)  # noqa: E731
    x, logits, ct = f32(N, D), 2 * f32(N, E), f32(N, D)
    ws = (f32(E, D, F), f32(E, D, F), f32(E, F, D))
    return x, moe_lib.route(logits, None, CFG), ws, ct


def _value_and_grads(fn):
    """jit: (x, routing, weights, cotangent) -> (y, metrics, d(x, w_gate, w_up, w_down))."""

    def run(x, routing, ws, ct):
        (y, metrics), vjp = jax.vjp(lambda x, *ws: fn(x, routing, *ws), x, *ws)
        return y, metrics, vjp((ct, jax.tree.map(jnp.zeros_like, metrics)))

    return jax.jit(run)


X, ROUTING, WS, CT = _inputs()
REF_Y, _, REF_GRADS = _value_and_grads(moe_lib.dropless_experts)(X, ROUTING, WS, CT)


def _assert_matches_reference(y, grads):
    np.testing.assert_allclose(y, REF_Y, atol=1e-5, rtol=1e-5)
    for g, ref in zip(grads, REF_GRADS):
        np.testing.assert_allclose(g, ref, atol=1e-5, rtol=1e-5)


def _numpy_capacity_reference(shards: int, capacity: int, real=None, real_first: bool = True):
    """Per source shard, pairs past `capacity` for an expert (token order, then k; the real
    tokens' before padding's unless not real_first) are dropped -> (y, dropped real pairs /
    real pairs)."""
    x, (wg, wu, wd) = np.asarray(X, np.float64), (np.asarray(w, np.float64) for w in WS)
    experts, weights = np.asarray(ROUTING.experts), np.asarray(ROUTING.weights, np.float64)
    real = np.ones(N, bool) if real is None else real
    y, dropped, n_local = np.zeros((N, D)), 0, N // shards
    for s in range(shards):
        count = np.zeros(E, int)
        tokens = range(s * n_local, (s + 1) * n_local)
        if real_first:
            tokens = [t for t in tokens if real[t]] + [t for t in tokens if not real[t]]
        for t in tokens:
            for k in range(K):
                e = experts[t, k]
                count[e] += 1
                if count[e] > capacity:
                    dropped += int(real[t])
                    continue
                g, u = x[t] @ wg[e], x[t] @ wu[e]
                y[t] += weights[t, k] * ((g / (1 + np.exp(-g)) * u) @ wd[e])
    return y, dropped / (real.sum() * K)


@pytest.mark.parametrize("shape", MESHES)
def test_capacity_matches_dropless_and_counts_drops(shape):
    mesh, rules = _mesh(shape), rules_for()
    # No drops: values and gradients equal the single-device dropless layer.
    y, metrics, grads = _value_and_grads(expert.make_expert_fn(mesh, rules, mode="capacity", capacity_factor=1e3))(
        X, ROUTING, WS, CT)
    _assert_matches_reference(y, grads)
    assert float(metrics["dropped_fraction"]) == 0.0
    # Small capacity: the drops follow the per-shard slot rule, counted over the global batch.
    shards = shape[0] * shape[1]
    fn = expert.make_expert_fn(mesh, rules, mode="capacity", capacity_factor=1.0)
    y, metrics = jax.jit(fn)(X, ROUTING, *WS)
    ref_y, ref_fraction = _numpy_capacity_reference(shards, expert.expert_capacity(N // shards, K, E, 1.0))
    assert ref_fraction > 0.05
    np.testing.assert_allclose(float(metrics["dropped_fraction"]), ref_fraction, rtol=1e-6)
    np.testing.assert_allclose(y, ref_y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 2, 2)])
def test_capacity_serves_real_tokens_before_padding(shape):
    """With `Routing.mask`, padding takes the slots real tokens leave: the first half of every
    shard's tokens is padding, which in token order alone would fill the slots first."""
    mesh, rules = _mesh(shape), rules_for()
    shards = shape[0] * shape[1]
    real = (np.arange(N) % (N // shards)) >= N // shards // 2
    fn = expert.make_expert_fn(mesh, rules, mode="capacity", capacity_factor=1.0)
    y, metrics = jax.jit(fn)(X, ROUTING._replace(mask=jnp.asarray(real)), *WS)
    ref_y, ref_fraction = _numpy_capacity_reference(shards, expert.expert_capacity(N // shards, K, E, 1.0), real)
    _, token_order = _numpy_capacity_reference(shards, expert.expert_capacity(N // shards, K, E, 1.0), real, False)
    np.testing.assert_allclose(y[real], ref_y[real], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["dropped_fraction"]), ref_fraction, rtol=1e-6)
    assert ref_fraction < token_order  # in token order alone, padding would have taken real tokens' slots


def test_capacity_rules():
    assert expert.expert_capacity(8, 4, 16, 1.0) == 2
    assert expert.expert_capacity(8, 4, 16, 1.25) == 3
    assert expert.expert_capacity(8, 4, 16, 1e3) == 8  # never more than the local tokens
    assert expert.dropless_fallback_capacity(8) == 8


def test_dropless_falls_back_on_cpu(caplog, monkeypatch):
    monkeypatch.setattr(expert, "_warned_cpu_fallback", False)
    mesh = _mesh((2, 4, 1))
    with caplog.at_level("WARNING"):
        fn = expert.make_expert_fn(mesh, rules_for(), mode="dropless")
        expert.make_expert_fn(mesh, rules_for(), mode="dropless")
    assert sum("ragged_all_to_all" in r.getMessage() for r in caplog.records) == 1
    y, metrics = jax.jit(fn)(X, ROUTING, *WS)
    np.testing.assert_allclose(y, REF_Y, atol=1e-5, rtol=1e-5)
    assert float(metrics["dropped_fraction"]) == 0.0


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                                axis_name):
    """`jax.lax.ragged_all_to_all` by its documented semantics, from all_gathers and masks."""
    n_dev = jax.lax.axis_size(axis_name)
    per_dev = input_offsets.shape[0] // n_dev
    me = jax.lax.axis_index(axis_name)
    ops, ins, sizes, outs = (jax.lax.all_gather(v, axis_name) for v in
                             (operand, input_offsets, send_sizes, output_offsets))
    rows = jnp.arange(output.shape[0])
    for src in range(n_dev):
        for j in range(per_dev):
            i = me * per_dev + j  # the sender's slice index addressed to me
            start, size, src_start = outs[src, i], sizes[src, i], ins[src, i]
            mask = (rows >= start) & (rows < start + size)
            take = jnp.clip(src_start + rows - start, 0, operand.shape[0] - 1)
            output = jnp.where(mask[:, None], ops[src][take], output)
    return output


@pytest.mark.parametrize("kernel", ["auto", "megablox"])
def test_ragged_path_with_emulated_collective(monkeypatch, kernel):
    """The dropless offsets/sizes bookkeeping, with the collective XLA:CPU lacks emulated; the
    owners' grouped matmul by ragged_dot (CPU's "auto") or megablox (Pallas interpret mode), on a
    receive buffer with rows past the received ones."""
    monkeypatch.setattr(expert, "_ragged_all_to_all", _emulated_ragged_all_to_all)
    monkeypatch.setattr(expert, "_ragged_supported", lambda: True)
    fn = functools.partial(expert.make_expert_fn(_mesh((1, 4, 2)), rules_for(), mode="dropless"), kernel=kernel)
    y, metrics, grads = _value_and_grads(fn)(X, ROUTING, WS, CT)
    _assert_matches_reference(y, grads)
    assert float(metrics["dropped_fraction"]) == 0.0


def test_compiled_program_moves_tokens_not_weights():
    fn = expert.make_expert_fn(_mesh((1, 8, 1)), rules_for(), mode="capacity", capacity_factor=2.0)
    text = jax.jit(fn).lower(X, ROUTING, *WS).compile().as_text()
    assert "all-to-all" in text
    assert "all-gather" not in text


def test_fsdp_gathers_weights_inside():
    mesh, rules = _mesh((2, 4, 1)), rules_for(fsdp=True)
    fn = expert.make_expert_fn(mesh, rules, mode="capacity", capacity_factor=1e3)
    y, _, grads = _value_and_grads(fn)(X, ROUTING, WS, CT)
    _assert_matches_reference(y, grads)


def test_plugs_into_moe_layer():
    mesh, rules = _mesh((2, 2, 2)), rules_for()
    layer = moe_lib.MoE(CFG, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    for name in ("gate", "w_gate", "w_up", "w_down"):  # big enough that routing matters
        v = getattr(layer, name)
        v[...] = jnp.asarray(rng.normal(0, 0.5, v.shape), jnp.float32)
    x = jnp.asarray(rng.normal(0, 1.0, (8, 8, D)), jnp.float32)
    ref_y, ref_stats = nnx.jit(lambda m, x: m(x))(layer, x)

    graphdef, state = nnx.split(layer)
    state = jax.tree.map(
        lambda v: v.replace(jax.device_put(v.get_value(), NamedSharding(mesh, to_pspec(v.axes, rules, mesh.axis_names)))),
        state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    x = jax.device_put(x, NamedSharding(mesh, to_pspec(("batch", "length", "embed"), rules, mesh.axis_names)))
    fn = expert.make_expert_fn(mesh, rules, mode="capacity", capacity_factor=1e3)
    graphdef = nnx.graphdef(moe_lib.set_expert_fn(layer, fn))  # the dispatch travels in the graphdef

    @jax.jit
    def sharded(state, x):
        with use_rules(mesh, rules):
            return nnx.merge(graphdef, state)(x)

    y, stats = sharded(state, x)
    np.testing.assert_allclose(y, ref_y, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(stats["loads"], ref_stats["loads"])
    assert float(stats["dropped_fraction"]) == 0.0
