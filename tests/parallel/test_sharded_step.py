"""Sharded train step and forward pass equal the single-device run, on every test mesh."""

import chex
import jax
import numpy as np
import pytest
from flax import nnx

from r1jax import config as config_lib
from r1jax.config import ConfigError
from r1jax.parallel import rules as rules_lib
from r1jax.parallel.dryrun import REMAT_WARNING, CaptureStderr
from r1jax.parallel.mesh import make_mesh as _make_mesh
from r1jax.train.step import TrainStep, synthetic_batch

MESHES = [(1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 4, 2), (2, 4, 1), (1, 8, 1)]
# Two MoE layers and MTP keep every feature in play while compiles stay short.
# Adam's first step is about lr * sign(g): where g is ~0 its rounding decides the update, so the
# test's eps keeps the comparison about sharding, not about the sign of rounding noise.
OVERRIDES = ("model.num_hidden_layers=3", "model.vocab_size=256", "batch_size=8", "seq_len=16", "optim.eps=1e-6")


def _cfg(mesh=(1, 1, 1), fsdp=False, *extra):
    d, e, m = mesh
    return config_lib.load(
        "configs/model/tiny-moe.yaml", *OVERRIDES, f"mesh.data={d}", f"mesh.expert={e}", f"mesh.model={m}",
        f"mesh.fsdp={str(fsdp).lower()}", *extra,
    )


def make_mesh(mesh_cfg):
    """The test meshes use the first data*expert*model of the 8 emulated devices."""
    n = mesh_cfg.data * mesh_cfg.expert * mesh_cfg.model
    return _make_mesh(mesh_cfg, jax.devices()[:n] if n > 0 else None)


def _host(tree):
    return jax.tree.map(np.array, tree)


@pytest.fixture(scope="module")
def reference():
    cfg = _cfg()
    step = TrainStep(cfg, None, keep_grads=True)
    state0 = _host(step.init(0))
    batch = _host(synthetic_batch(cfg, jax.random.key(1)))
    # The packed case: two documents in some rows must stay apart on every mesh too.
    batch["segment_ids"][::2, 8:] = 2
    batch["positions"][::2, 8:] -= 8
    metrics_fwd, logits = step.evaluate(jax.device_put(state0), batch)
    state1, metrics = step(jax.device_put(state0), batch)
    return dict(state0=state0, batch=batch, state1=_host(state1), metrics=_host(metrics),
                metrics_fwd=_host(metrics_fwd), logits=np.asarray(logits))


def _rel_close(actual, expected, rtol=1e-5, atol=1e-7):
    chex.assert_trees_all_close(actual, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated", "fsdp"])
@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_step_equals_single_device(reference, shape, fsdp):
    cfg = _cfg(shape, fsdp)
    mesh = make_mesh(cfg.mesh)
    step = TrainStep(cfg, mesh, keep_grads=True)
    state = step.place(reference["state0"])
    batch = step.place_batch(reference["batch"])

    metrics_fwd, logits = step.evaluate(state, batch)
    _rel_close(float(metrics_fwd["loss"]), float(reference["metrics_fwd"]["loss"]))
    _rel_close(np.asarray(logits), reference["logits"], atol=1e-5)

    with CaptureStderr() as log:  # the partitioner's warnings go to the C++ log while compiling
        state1, metrics = step(state, batch)
    assert REMAT_WARNING not in log.text, log.text[-2000:]
    ref = reference["metrics"]
    for key in ("loss", "ce", "mtp_ce", "balance_loss", "grad_norm"):
        _rel_close(float(metrics[key]), float(ref[key]))
    _rel_close(_host(metrics["grads"]), ref["grads"], atol=1e-6)
    _rel_close(_host(state1.params), reference["state1"].params, atol=1e-6)
    _rel_close(_host(state1.extra), reference["state1"].extra)


def test_state_is_split_over_the_mesh():
    cfg = _cfg((2, 2, 2), fsdp=True)
    mesh = make_mesh(cfg.mesh)
    step = TrainStep(cfg, mesh)
    params = step.state_shardings.params
    abstract = step.abstract.params
    flat = dict(nnx.to_flat_state(abstract))
    for path, sharding in nnx.to_flat_state(params):
        leaf = flat[path]
        spec = sharding.value.spec
        if int(np.prod(leaf.shape)) >= 4096:
            assert any(axis is not None for axis in spec), f"{path} {leaf.shape} is replicated"
        if path[-1] in ("w_gate", "w_up", "w_down"):  # [(layers,) E, D, F]
            experts_dim = len(leaf.shape) - 3
            assert spec[experts_dim] == "expert", f"{path}: experts not split on `expert`: {spec}"


def test_optimizer_state_follows_params():
    cfg = _cfg((2, 2, 2), fsdp=True)
    step = TrainStep(cfg, make_mesh(cfg.mesh))
    param_specs = {s.spec for s in jax.tree.leaves(step.state_shardings.params)}
    opt_specs = {s.spec for s in jax.tree.leaves(step.state_shardings.opt_state)}
    assert param_specs <= opt_specs


@pytest.mark.parametrize(
    "overrides, key",
    [
        (("mesh.data=3",), "mesh"),
        (("mesh.data=4", "mesh.expert=4", "mesh.model=1"), "mesh"),
        (("mesh.data=1", "mesh.expert=1", "mesh.model=-1", "model.num_attention_heads=4", "model.num_key_value_heads=4"),
         "mesh.model"),
        (("mesh.data=1", "mesh.expert=8", "mesh.model=1", "model.n_routed_experts=12", "model.n_group=4"), "mesh.expert"),
    ],
)
def test_bad_mesh_fails_before_compiling(overrides, key):
    with pytest.raises(ConfigError) as err:
        cfg = config_lib.load("configs/model/tiny-moe.yaml", *OVERRIDES, *overrides)
        TrainStep(cfg, _make_mesh(cfg.mesh))  # all 8 devices: the product must match
    assert err.value.key == key, str(err.value)


def test_rules_table_maps_batch_over_data_and_expert():
    spec = rules_lib.to_pspec(("batch", "length", "embed"), rules_lib.rules_for(fsdp=True), ("data", "expert", "model"))
    assert spec == jax.sharding.PartitionSpec(("data", "expert"), None, None)
    spec = rules_lib.to_pspec(("experts", "embed", "mlp"), rules_lib.rules_for(fsdp=True), ("data", "expert", "model"))
    assert spec == jax.sharding.PartitionSpec("expert", "data", "model")


def test_expert_parallel_step_uses_all_to_all_and_never_gathers_expert_weights():
    cfg = _cfg((1, 8, 1))
    step = TrainStep(cfg, make_mesh(cfg.mesh))
    text = step.lower((cfg.batch_size, cfg.seq_len)).compile().as_text()
    assert "all-to-all" in text
    m = cfg.model
    e, d, f = m.n_routed_experts, m.hidden_size, m.moe_intermediate_size
    expert_shapes = [f"[{e},{d},{f}]", f"[{e},{f},{d}]", f"[{m.num_moe_layers},{e},{d},{f}]",
                     f"[{m.num_moe_layers},{e},{f},{d}]"]
    gathers = [line for line in text.splitlines() if "all-gather(" in line or "all-gather-start(" in line]
    for line in gathers:
        result_type = line.split("=", 1)[1].split("all-gather", 1)[0]
        assert not any(shape in result_type for shape in expert_shapes), line.strip()[:300]


@pytest.mark.parametrize("shape, fsdp", [((2, 2, 2), False), ((1, 4, 2), True)])
def test_same_seed_same_initial_params_on_every_mesh(shape, fsdp):
    """A run can move between meshes without a checkpoint: init(seed) is mesh-invariant
    (partitionable threefry: each shard draws its own slice of the same random stream)."""
    single = TrainStep(_cfg()).init(3)
    cfg = _cfg(shape, fsdp)
    sharded = TrainStep(cfg, make_mesh(cfg.mesh)).init(3)
    assert any(len(x.sharding.device_set) > 1 for x in jax.tree.leaves(sharded.params))
    chex.assert_trees_all_equal(_host(single.params), _host(sharded.params))
    chex.assert_trees_all_equal(_host(single.extra), _host(sharded.extra))
