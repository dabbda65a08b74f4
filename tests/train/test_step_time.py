"""The step-time model's inputs: FLOPs of the compiled step against the analytic count, the HLO
walk's loop trip counts, collective bytes against their formulas, and the roofline arithmetic."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from r1jax import config as config_lib
from r1jax.parallel.chips import CHIPS, get_chip
from r1jax.train.dryrun import candidate_meshes
from r1jax.train.step import TrainStep
from r1jax.train.step_time import HloCosts, group_size, hlo_costs, predict, train_flops

B, T = 4, 64


def _tiny_mla(*overrides):
    """tiny-moe with its routed experts off: MLA attention, dense FFNs, an MTP depth. With routed
    experts the CPU path pads tokens to expert tiles (and capacity dispatch to slots), so XLA
    runs more than 6·N_active·tokens; the dense variant is exact."""
    return config_lib.load("configs/model/tiny-moe.yaml", "model.n_routed_experts=0", "model.num_hidden_layers=2",
                           f"batch_size={B}", f"seq_len={T}", *overrides)


def test_flops_of_the_tiny_step_match_the_analytic_count():
    # Straight-line layers (no while loop): XLA's cost analysis sees every op once. It counts
    # elementwise FLOPs too, hence a few percent above the matmul-only analytic count.
    cfg = _tiny_mla("model.scan_unroll=8")
    analytic = train_flops(cfg.model, B, T, computed=True)
    compiled = TrainStep(cfg).lower((B, T)).compile()
    assert compiled.cost_analysis()["flops"] == pytest.approx(analytic, rel=0.05)
    assert hlo_costs(compiled.as_text()).flops == pytest.approx(analytic, rel=0.01)
    # Model FLOPs count causal attention as half the square; the block-causal kernel runs more.
    assert train_flops(cfg.model, B, T) < analytic


def test_the_hlo_walk_multiplies_the_layer_scan_by_its_trip_count():
    cfg = config_lib.load("configs/model/tiny-dense.yaml", "model.scan_unroll=1", f"batch_size={B}", f"seq_len={T}")
    compiled = TrainStep(cfg).lower((B, T)).compile()
    costs = hlo_costs(compiled.as_text())
    assert costs.loops and costs.unknown_loops == 0
    assert costs.flops == pytest.approx(train_flops(cfg.model, B, T, computed=True), rel=0.01)
    # XLA's own cost analysis counts the loop body once: this is why the walk exists.
    assert compiled.cost_analysis()["flops"] < 0.9 * costs.flops


def _mesh(shape, names):
    return Mesh(np.asarray(jax.devices()[: int(np.prod(shape))]).reshape(shape), names,
                axis_types=(AxisType.Auto,) * len(names))


def test_collective_bytes_match_their_formulas_on_eight_devices():
    mesh = _mesh((4, 2), ("x", "y"))

    def body(a, b, c, d):  # per-device blocks
        gathered = jax.lax.all_gather(a, "x", tiled=True)  # [64, 128] f32 from [16, 128]
        summed = jax.lax.psum(b, "y")  # [32, 32] f32 over y (2 devices)
        scattered = jax.lax.psum_scatter(c, "x", tiled=True)  # [64, 16] bf16 -> [16, 16]
        swapped = jax.lax.all_to_all(d, "x", 0, 0, tiled=True)  # [32, 8] bf16 (f32 on XLA:CPU)
        return gathered, summed, scattered, swapped

    f = jax.shard_map(body, mesh=mesh, in_specs=(P("x"), P(), P(), P("x")),
                      out_specs=(P(), P(), P("x"), P("x")), check_vma=False)
    args = (jax.ShapeDtypeStruct((64, 128), jnp.float32, sharding=NamedSharding(mesh, P("x"))),
            jax.ShapeDtypeStruct((32, 32), jnp.float32, sharding=NamedSharding(mesh, P())),
            jax.ShapeDtypeStruct((64, 16), jnp.bfloat16, sharding=NamedSharding(mesh, P())),
            jax.ShapeDtypeStruct((128, 8), jnp.bfloat16, sharding=NamedSharding(mesh, P("x"))))
    costs = hlo_costs(jax.jit(f).lower(*args).compile().as_text())
    assert costs.collectives["all-gather"] == 64 * 128 * 4 * 3 / 4  # result x (n-1)/n
    assert costs.collectives["all-reduce"] == 2 * 32 * 32 * 4 * 1 / 2  # 2 x bytes x (n-1)/n, n = |y|
    assert costs.collectives["reduce-scatter"] == 64 * 16 * 2 * 3 / 4  # operand x (n-1)/n
    # buffer x (n-1)/n, at bf16: XLA:CPU promotes it to f32 around the op, a TPU would not
    assert costs.collectives["all-to-all"] == 32 * 8 * 2 * 3 / 4


def test_collectives_inside_a_scan_count_once_a_layer():
    mesh = _mesh((8,), ("d",))

    def f(ws, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]

    ws = jax.ShapeDtypeStruct((6, 256, 256), jnp.float32, sharding=NamedSharding(mesh, P(None, None, "d")))
    x = jax.ShapeDtypeStruct((128, 256), jnp.float32, sharding=NamedSharding(mesh, P("d")))
    costs = hlo_costs(jax.jit(f, out_shardings=NamedSharding(mesh, P("d"))).lower(ws, x).compile().as_text())
    assert costs.loops == [6]
    assert costs.flops == 6 * 2 * 16 * 256 * 256  # 16 rows a device
    assert costs.collectives["all-gather"] == 6 * 256 * 256 * 4 * 7 / 8  # the weight, gathered each layer


@pytest.mark.parametrize("attrs,n", [
    ("replica_groups={{0,2},{1,3},{4,6},{5,7}}, metadata={}", 2),
    ("replica_groups=[2,4]<=[4,2]T(1,0), use_global_device_ids=true", 4),
    ("replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, to_apply=%add", 4),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=2,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_2'}, x=1", 2),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0','axis_1'}", 8),
    ("channel_id=1", 8),
])
def test_group_size_reads_every_replica_group_format(attrs, n):
    assert group_size(attrs, 8) == n


def test_roofline_arithmetic():
    v5p = CHIPS["v5p"]
    costs = HloCosts(flops=459e12, hbm_bytes=2765e9 / 2, collectives={"all-gather": 300e9})
    t = predict(costs, v5p, model_flops=229.5e12, tokens=1000, peak_bytes=90 * 1024**3)
    assert (t.compute_s, t.hbm_s, t.collective_s) == pytest.approx((1.0, 0.5, 0.5))  # 300 GB at 600 GB/s out
    assert t.lower_s == 1.0 and t.serial_s == pytest.approx(2.0) and t.bound == "compute"
    assert t.mfu_upper == pytest.approx(0.5) and t.tokens_per_s == pytest.approx(1000)
    assert t.fits and not predict(costs, CHIPS["v5e"], model_flops=1, tokens=1, peak_bytes=90 * 1024**3).fits
    assert get_chip("TPU7x") is CHIPS["ironwood"] and get_chip("tpu-v5p") is v5p


def test_the_search_keeps_only_layouts_the_config_allows():
    cfg = config_lib.load("configs/model/tiny-moe.yaml", "batch_size=8")
    kept, _ = candidate_meshes(cfg, 8, hbm_bytes=16 * 1024**3)
    assert kept and all(d * e * m == 8 for d, e, m, _ in kept)
    heads, experts = cfg.model.num_attention_heads, cfg.model.n_routed_experts
    assert all(heads % m == 0 and experts % e == 0 and 8 % (d * e) == 0 for d, e, m, _ in kept)
    assert {fsdp for *_, fsdp in kept} == {True, False}


def test_an_interpret_mode_kernel_counts_its_buffers_once():
    """Splash attention in interpret mode is a grid loop copying whole buffers each iteration;
    the walk counts each kernel as one op, so the flash path moves fewer HBM bytes than the
    XLA path that materialises the logits (counted per grid step it would move 3x more)."""
    from r1jax.model.attention_kernels import splash_attend
    from r1jax.model.layers import causal_attend

    b, t, h, k, v = 1, 1024, 2, 64, 32
    shapes = [jax.ShapeDtypeStruct((b, t, h, k), jnp.float32)] * 2 + [jax.ShapeDtypeStruct((b, t, h, v), jnp.float32),
                                                                      jax.ShapeDtypeStruct((b, t), jnp.int32)]

    def costs(attend):
        grad = jax.jit(jax.grad(lambda q, k, v, s: attend(q, k, v, s, 0.1).sum(), (0, 1, 2)))
        return hlo_costs(grad.lower(*shapes).compile().as_text())

    flash, xla = costs(splash_attend), costs(causal_attend)
    assert flash.kernels == 3 and xla.kernels == 0  # forward, dq, dkv
    assert flash.hbm_bytes < xla.hbm_bytes / 2, (flash.hbm_bytes, xla.hbm_bytes)


def test_the_dry_run_compiles_and_names_the_pod_kernels():
    from r1jax.train.dryrun import dry_run_kernels

    cfg = config_lib.load("configs/deepseek-v3-671b-pod.yaml")
    compiled, line = dry_run_kernels(cfg)
    assert cfg.model.attention_impl == "auto" and compiled.model.attention_impl == "splash"
    assert "splash" in line and "megablox on TPU" in line and "ragged_dot on GPU" in line
    xla, line = dry_run_kernels(config_lib.load("configs/deepseek-v3-671b-pod.yaml", "model.attention_impl=xla"))
    assert xla.model.attention_impl == "xla" and "block-causal" in line
