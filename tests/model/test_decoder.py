"""The full decoder: parameter counts of the released shapes (spec §1, eval_shape only), forward
shapes, causality and packed segments of the tiny MoE config, a dense GQA student, and config
validation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from r1jax.config import ConfigError, load, load_model
from r1jax.model.decoder import Decoder
from r1jax.model.moe import RoutingBias
from r1jax.model.summary import count_params

# ----------------------------------------------------------------------------- parameter counts


def _live_bytes() -> int:
    return sum(a.nbytes for a in jax.live_arrays())


@pytest.mark.parametrize(
    "name, total, active, mtp",
    [
        # spec §1: 671.03 B total, 37.55 B active, MTP 11.61 B
        ("deepseek-v3-671b", (671.03e9, 5e-4), (37.55e9, 2e-3), (11.61e9, 1e-3)),
        ("deepseek-v2-lite", (15.71e9, 5e-4), None, (0, 0)),
    ],
)
def test_param_counts_from_eval_shape(name, total, active, mtp):
    before = _live_bytes()
    count = count_params(load_model(f"configs/model/{name}.yaml"))
    assert _live_bytes() - before < 1 << 20  # nothing of the model's size was allocated
    assert count.total == pytest.approx(total[0], rel=total[1])
    if active is not None:
        assert count.active == pytest.approx(active[0], rel=active[1])
    assert count.mtp == pytest.approx(mtp[0], rel=mtp[1], abs=0)


# ----------------------------------------------------------------------------- tiny models


def _materialise(model, seed: int):
    """Fills an abstract model with NumPy random values (no random-init compiles): N(0, 0.05)
    weights, norm scales near 1, a small non-zero routing bias."""
    rng = np.random.default_rng(seed)
    graphdef, params, biases, rest = nnx.split(model, nnx.Param, RoutingBias, ...)
    assert not jax.tree.leaves(rest)

    def fill(path, leaf):
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        if name.endswith("norm/weight"):
            value = 1.0 + rng.normal(0, 0.1, leaf.shape)
        else:
            value = rng.normal(0, 0.05, leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    params = jax.tree_util.tree_map_with_path(fill, params)
    biases = jax.tree.map(lambda b: jnp.asarray(rng.uniform(-0.02, 0.02, b.shape), b.dtype), biases)
    return nnx.merge(graphdef, params, biases, rest)


_jit_forward = jax.jit(
    lambda graphdef, state, ids, pos, seg, nxt: nnx.merge(graphdef, state)(ids, pos, seg, mtp_inputs=nxt),
    static_argnums=0,
)


def _forward(model, ids, positions=None, segment_ids=None, mtp_inputs=None):
    b, t = ids.shape
    positions = np.broadcast_to(np.arange(t), (b, t)) if positions is None else positions
    segment_ids = np.ones((b, t)) if segment_ids is None else segment_ids
    mtp_inputs = np.roll(ids, -1, axis=1) if mtp_inputs is None else mtp_inputs
    i32 = lambda a: jnp.asarray(a, jnp.int32)  # noqa: E731
    return _jit_forward(*nnx.split(model), i32(ids), i32(positions), i32(segment_ids), i32(mtp_inputs))


@pytest.fixture(scope="module")
def tiny():
    cfg = load_model("configs/model/tiny-moe.yaml")
    assert cfg.dtype == "float32" and cfg.param_dtype == "float32"
    return cfg, _materialise(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))), seed=0)


def _ids(cfg, b, t, seed):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t))


def test_tiny_forward_shapes(tiny):
    cfg, model = tiny
    b, t = 2, 8
    out = _forward(model, _ids(cfg, b, t, 0))
    chex.assert_shape(out.logits, (b, t, cfg.vocab_size))
    chex.assert_shape(out.mtp_logits, (cfg.num_nextn_predict_layers, b, t, cfg.vocab_size))
    chex.assert_shape(out.expert_loads, (cfg.num_moe_layers, cfg.n_routed_experts))
    chex.assert_shape(out.hidden, (b, t, cfg.hidden_size))
    chex.assert_shape(out.balance_loss, ())
    chex.assert_tree_all_finite((out.logits, out.mtp_logits, out.balance_loss))
    np.testing.assert_array_equal(out.expert_loads.sum(-1), b * t * cfg.num_experts_per_tok)
    assert float(out.balance_loss) > 0
    # Layers are stacked on a leading axis: 1 dense + 3 MoE for tiny-moe.
    assert model.dense_layers.attn.wq_a.value.shape == (1, cfg.hidden_size, cfg.q_lora_rank)
    assert model.moe_layers.ffn.w_gate.value.shape == (3, 16, cfg.hidden_size, cfg.moe_intermediate_size)
    assert model.moe_layers.ffn.bias.value.shape == (3, 16)


def test_tiny_decoder_is_causal(tiny):
    cfg, model = tiny
    ids = _ids(cfg, 2, 8, 1)
    base = _forward(model, ids)
    for t in (2, 6):
        changed = ids.copy()
        changed[:, t] = (changed[:, t] + 1) % cfg.vocab_size
        out = _forward(model, changed, mtp_inputs=np.roll(ids, -1, axis=1))
        chex.assert_trees_all_close(out.logits[:, :t], base.logits[:, :t], atol=1e-6, rtol=1e-6)
        chex.assert_trees_all_close(out.mtp_logits[:, :, :t], base.mtp_logits[:, :, :t], atol=1e-6, rtol=1e-6)
        assert (np.abs(np.asarray(out.logits[:, t:] - base.logits[:, t:])).max(-1) > 1e-5).all()


def test_tiny_decoder_packed_segments(tiny):
    cfg, model = tiny
    ids = _ids(cfg, 1, 8, 2)
    nxt = _ids(cfg, 1, 8, 3)
    seg = np.array([[1, 1, 1, 1, 2, 2, 2, 2]])
    pos = np.array([[0, 1, 2, 3, 0, 1, 2, 3]])
    packed = _forward(model, np.repeat(ids, 2, 0), np.repeat(pos, 2, 0), np.repeat(seg, 2, 0), np.repeat(nxt, 2, 0))
    # Each segment alone at the start of its own row (positions 0..3, one segment). The 4 filler
    # tokens after it cannot reach back (causality, tested above); they keep the compiled shape.
    filler = _ids(cfg, 2, 4, 4)
    alone_ids = np.concatenate([ids.reshape(2, 4), filler], axis=1)
    alone = _forward(model, alone_ids, mtp_inputs=np.concatenate([nxt.reshape(2, 4), filler], axis=1))
    for s in (0, 1):
        part = slice(4 * s, 4 * s + 4)
        chex.assert_trees_all_close(packed.logits[0, part], alone.logits[s, :4], atol=1e-5, rtol=1e-5)
        chex.assert_trees_all_close(packed.mtp_logits[:, 0, part], alone.mtp_logits[:, s, :4], atol=1e-5, rtol=1e-5)
    # Not vacuous: without the segment ids segment 2 would see segment 1.
    unpacked = _forward(model, np.repeat(ids, 2, 0), mtp_inputs=np.repeat(nxt, 2, 0))
    assert not np.allclose(unpacked.logits[0, 4:], alone.logits[1, :4], atol=1e-3)


def test_dense_gqa_student_forward():
    cfg = load_model("configs/model/r1-distill-qwen-1.5b.yaml", "vocab_size=256", "hidden_size=64",
                     "num_hidden_layers=2", "num_attention_heads=4", "num_key_value_heads=2",
                     "intermediate_size=96", "dtype=float32")
    assert not cfg.is_mla and not cfg.is_moe and cfg.qkv_bias
    model = _materialise(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))), seed=4)
    assert model.moe_layers is None and len(model.mtp) == 0
    attn = model.dense_layers.attn
    assert attn.wq.value.shape == (2, 64, 4, 16) and attn.wk.value.shape == (2, 64, 2, 16)
    assert attn.bq.value.shape == (2, 4, 16)
    ids = _ids(cfg, 2, 8, 5)
    out = _forward(model, ids)
    chex.assert_shape(out.logits, (2, 8, 256))
    chex.assert_tree_all_finite(out.logits)
    assert out.mtp_logits is None and out.expert_loads is None and float(out.balance_loss) == 0.0
    changed = ids.copy()
    changed[:, 5] = (changed[:, 5] + 1) % 256
    out2 = _forward(model, changed)
    chex.assert_trees_all_close(out2.logits[:, :5], out.logits[:, :5], atol=1e-6, rtol=1e-6)
    assert not np.allclose(out2.logits[:, 5:], out.logits[:, 5:], atol=1e-4)


# ----------------------------------------------------------------------------- config validation

TINY = "configs/model/tiny-moe.yaml"


def _raises(key, fn, *args):
    with pytest.raises(ConfigError) as info:
        fn(*args)
    assert info.value.key == key, (info.value.key, str(info.value))
    assert key in str(info.value)
    return info.value


def test_config_unknown_key(tmp_path):
    _raises("model.not_a_field", load, TINY, "model.not_a_field=3")
    bad = tmp_path / "bad.yaml"
    bad.write_text(open(TINY).read() + "hidden_sise: 12\n")
    _raises("model.hidden_sise", load, bad)


def test_config_heads_not_divisible_by_kv_heads():
    e = _raises("model.num_attention_heads", load, "configs/model/r1-distill-qwen-1.5b.yaml",
                "model.num_key_value_heads=5")
    assert "num_key_value_heads" in str(e)


def test_config_topk_group_above_n_group():
    _raises("model.topk_group", load, TINY, "model.topk_group=5")


def test_config_missing_required_field(tmp_path):
    text = "".join(line for line in open(TINY).read().splitlines(True) if not line.startswith("vocab_size"))
    path = tmp_path / "no_vocab.yaml"
    path.write_text(text)
    _raises("model.vocab_size", load, path)


def test_config_bad_override_syntax():
    _raises("model.hidden_size", load, TINY, "model.hidden_size")  # no '='
    _raises("model.hidden_size", load, TINY, "model.hidden_size=wide")  # not an integer


def test_config_mesh_model_must_divide_heads():
    e = _raises("mesh.model", load, TINY, "mesh.model=3")
    assert "8" in str(e)
    assert load(TINY, "mesh.model=4").mesh.model == 4


def test_config_valid_override():
    cfg = load(TINY, "model.hidden_size=64")
    assert cfg.model.hidden_size == 64 and cfg.model.num_hidden_layers == 4
    assert load_model(TINY, "hidden_size=64").hidden_size == 64
    assert load(TINY).model.hidden_size == 128


def test_unrolled_layer_scan_equals_the_rolled_scan(tiny):
    """scan_unroll changes the compiled program, not the function: logits and loads as rolled."""
    import dataclasses

    cfg, model = tiny
    unrolled = nnx.clone(model)
    unrolled.cfg = dataclasses.replace(cfg, scan_unroll=4)  # the decoder reads it when called
    ids = _ids(cfg, 2, 8, 5)
    a, b = _forward(model, ids), _forward(unrolled, ids)
    chex.assert_trees_all_close((a.logits, a.mtp_logits), (b.logits, b.mtp_logits), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(a.expert_loads, b.expert_loads)
