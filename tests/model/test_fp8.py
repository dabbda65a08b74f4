"""FP8 experts (`expert_dtype: float8_e4m3fn`): the block format against a per-block NumPy loop,
and a decoder holding its routed experts in fp8 against the same decoder holding their
dequantized values as plain Params: the same logits, the same greedy tokens."""

import functools
from dataclasses import replace

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from r1jax.config import Config, ConfigError, MeshConfig, load_model
from r1jax.train.step import TrainStep
from r1jax.model import fp8
from r1jax.model.decoder import Decoder
from r1jax.model.moe import EXPERT_WEIGHTS, FP8Weight
from r1jax.parallel.mesh import make_mesh
from r1jax.parallel.rules import rules_for
from r1jax.sampling.engine import SamplingParams, generate
from r1jax.train.state import shardings
from tests.sampling import prompts, tiny_moe

# HF's [out, in] block; neither divides tiny-moe's D 128 or F 64 both ways, so edge blocks are
# partial, and a swapped orientation would change the scale grid's shape.
BLOCK = (48, 32)


def _loop_quantize(w, block):
    """One block at a time: scale_inv = max|W| / 448 (1 for an all-zero block), Q = W / scale_inv."""
    r, c = w.shape
    q = np.zeros(w.shape, ml_dtypes.float8_e4m3fn)
    s = np.zeros((-(-r // block[0]), -(-c // block[1])), np.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rows, cols = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            amax = np.abs(w[rows, cols]).max()
            s[i, j] = amax / np.float32(448) if amax > 0 else 1.0
            q[rows, cols] = (w[rows, cols] / s[i, j]).astype(ml_dtypes.float8_e4m3fn)
    return q, s


def _loop_dequantize(q, s, block):
    w = np.zeros(q.shape, np.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rows, cols = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            w[rows, cols] = q[rows, cols].astype(np.float32) * s[i, j]
    return w


@pytest.mark.parametrize("block", [(128, 128), (64, 96)])
def test_quantize_and_dequantize_against_block_loop(block):
    rng = np.random.default_rng(0)
    w = (rng.normal(0, 1, (2, 200, 300)) * rng.uniform(0.01, 10, (2, 1, 300))).astype(np.float32)
    w[1, :block[0], :block[1]] = 0  # an all-zero block
    q, s = fp8.quantize(w, block)
    chex.assert_shape(s, fp8.scale_shape(w.shape, block))
    chex.assert_trees_all_equal_dtypes((q, s), (np.zeros((), ml_dtypes.float8_e4m3fn), np.zeros((), np.float32)))
    for k in range(2):
        want_q, want_s = _loop_quantize(w[k], block)
        np.testing.assert_array_equal(q[k].view(np.uint8), want_q.view(np.uint8))
        np.testing.assert_array_equal(s[k], want_s)
        np.testing.assert_array_equal(fp8.dequantize(q, s, block)[k], _loop_dequantize(q[k], s[k], block))
    # JAX: the same dequantized values; its scales within an ulp (XLA turns x / 448 into x * (1/448)).
    jq, js = fp8.quantize(jnp.asarray(w), block)
    np.testing.assert_allclose(np.asarray(js), s, rtol=2**-23, atol=0)
    jq, js = np.asarray(jq), np.asarray(js)
    np.testing.assert_array_equal(np.asarray(fp8.dequantize(jnp.asarray(jq), jnp.asarray(js), block)),
                                  fp8.dequantize(jq, js, block))
    # Within fp8's 3-bit mantissa (relative 2^-4) of W, or its subnormal step, block by block.
    err = np.abs(fp8.dequantize(q, s, block) - w)
    step = np.repeat(np.repeat(s, block[0], 1), block[1], 2)[:, :200, :300]
    assert np.all(err <= np.maximum(np.abs(w) * 2.0**-4, step * 2.0**-9))


@functools.cache
def _pair() -> tuple[Decoder, Decoder]:
    """(fp8 model, plain model): tiny-moe with its routed experts quantized, and the same model
    with the dequantized experts as Params. Every other weight is shared."""
    plain = tiny_moe()
    cfg = replace(plain.cfg, expert_dtype="float8_e4m3fn", fp8_block_size=BLOCK)
    graphdef, abstract_params, abstract_extra = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))),
                                                         nnx.Param, ...)
    plain_graphdef, params, extra = nnx.split(plain, nnx.Param, ...)
    plain_flat = dict(nnx.to_flat_state(params)) | dict(nnx.to_flat_state(extra))
    block = (BLOCK[1], BLOCK[0])  # the stored [in, out] orientation
    fill, dequantized = {}, {}
    for path, _ in nnx.to_flat_state(abstract_extra):
        if path[-1] in EXPERT_WEIGHTS:
            q, s = fp8.quantize(np.asarray(plain_flat[path][...]), block)
            fill[path], fill[path[:-1] + (f"{path[-1]}_scale_inv",)] = q, s
            dequantized[path] = fp8.dequantize(q, s, block)
        elif not path[-1].endswith("_scale_inv"):
            fill[path] = plain_flat[path][...]
    for path, _ in nnx.to_flat_state(abstract_params):
        fill[path] = plain_flat[path][...]

    def filled(state):
        flat = []
        for p, v in nnx.to_flat_state(state):
            value = jnp.asarray(fill[p])
            assert value.shape == v.shape and value.dtype == v.dtype, p
            flat.append((p, v.replace(value)))
        return nnx.from_flat_state(flat)

    quantized = nnx.merge(graphdef, filled(abstract_params), filled(abstract_extra))
    twin_params = nnx.from_flat_state([(p, v.replace(jnp.asarray(dequantized.get(p, v[...]))))
                                       for p, v in nnx.to_flat_state(params)])
    return quantized, nnx.merge(plain_graphdef, twin_params, extra)


def test_fp8_experts_live_outside_params():
    quantized, _ = _pair()
    cfg = quantized.cfg
    _, params, extra = nnx.split(quantized, nnx.Param, ...)
    flat_params, flat_extra = dict(nnx.to_flat_state(params)), dict(nnx.to_flat_state(extra))
    e, d, f, lm = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_moe_layers
    # Stored [in, out]: the scale grid is HF's [out, in] grid transposed.
    want = {"w_gate": ((e, d, f), (e, -(-d // BLOCK[1]), -(-f // BLOCK[0]))),
            "w_up": ((e, d, f), (e, -(-d // BLOCK[1]), -(-f // BLOCK[0]))),
            "w_down": ((e, f, d), (e, -(-f // BLOCK[1]), -(-d // BLOCK[0])))}
    for prefix, lead in ((("moe_layers", "ffn"), (lm,)), (("mtp", 0, "block", "ffn"), ())):
        for name, (w_shape, s_shape) in want.items():
            w, s = flat_extra[prefix + (name,)], flat_extra[prefix + (f"{name}_scale_inv",)]
            assert isinstance(w, FP8Weight) and isinstance(s, FP8Weight)
            chex.assert_shape(w[...], lead + w_shape)
            chex.assert_shape(s[...], lead + s_shape)
            assert w[...].dtype == jnp.float8_e4m3fn and s[...].dtype == jnp.float32
            assert prefix + (name,) not in flat_params
    assert not any(v[...].dtype == jnp.float8_e4m3fn for v in flat_params.values())
    # Sharding: experts over `expert`, F over `model`; the scale grid by expert only.
    mesh = make_mesh(MeshConfig(data=2, expert=2, model=2), jax.devices()[:8])
    spec = {p: v.get_raw_value().spec for p, v in nnx.to_flat_state(shardings(extra, mesh, rules_for(False)))}
    assert spec[("moe_layers", "ffn", "w_gate")] == P(None, "expert", None, "model")
    assert spec[("moe_layers", "ffn", "w_down")] == P(None, "expert", "model", None)
    assert spec[("moe_layers", "ffn", "w_gate_scale_inv")] == P(None, "expert", None, None)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids):
    out = nnx.merge(graphdef, state)(ids, mtp_inputs=jnp.roll(ids, -1, axis=1))
    return out.logits, out.mtp_logits


def test_fp8_logits_equal_dequantized_params():
    quantized, plain = _pair()
    ids = jnp.asarray(prompts(plain.cfg, (12, 12), seed=3))
    got, want = _forward(*nnx.split(quantized), ids), _forward(*nnx.split(plain), ids)
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
    assert float(jnp.abs(want[0]).max()) > 1.0


def test_fp8_greedy_decode_equals_dequantized_params():
    """Prefill runs the MoE layers, decode the engine's per-layer dense expert layout: both read
    the experts through `MoE.expert_weights`."""
    quantized, plain = _pair()
    ps = prompts(plain.cfg, (5, 9), seed=4)
    greedy = SamplingParams(temperature=0.0, max_tokens=6)
    got = generate(quantized, ps, greedy, cache_dtype=jnp.float32, slots=2, max_len=64)
    want = generate(plain, ps, greedy, cache_dtype=jnp.float32, slots=2, max_len=64)
    for g, w in zip(got, want):
        assert g[0].token_ids == w[0].token_ids
        np.testing.assert_allclose(g[0].logprobs, w[0].logprobs, atol=1e-5)


def test_fp8_sharded_decode_equals_dequantized_params():
    """On a mesh (experts over `expert`, F over `model`): the fp8 arrays are placed by their axes
    and dequantized inside the compiled step, before the expert-parallel dispatch."""
    quantized, plain = _pair()
    ps = prompts(plain.cfg, (5, 9), seed=4)
    greedy = SamplingParams(temperature=0.0, max_tokens=6)
    mesh = make_mesh(MeshConfig(data=1, expert=2, model=2), jax.devices()[:4])
    got = generate(quantized, ps, greedy, cache_dtype=jnp.float32, slots=2, max_len=64, mesh=mesh)
    want = generate(plain, ps, greedy, cache_dtype=jnp.float32, slots=2, max_len=64)
    for g, w in zip(got, want):
        assert g[0].token_ids == w[0].token_ids
        np.testing.assert_allclose(g[0].logprobs, w[0].logprobs, atol=1e-4)


def test_fp8_experts_config():
    cfg = load_model("configs/model/tiny-moe.yaml", "expert_dtype=float8_e4m3fn", "fp8_block_size=[48, 32]")
    assert cfg.expert_dtype == "float8_e4m3fn" and cfg.fp8_block_size == (48, 32)
    with pytest.raises(ConfigError) as e:
        TrainStep(Config(model=cfg, mode="grpo"))  # a Config may carry them (serving), training refuses
    assert e.value.key == "model.expert_dtype"
    with pytest.raises(ConfigError) as e:
        load_model("configs/model/tiny-moe.yaml", "fp8_block_size=[128]")
    assert e.value.key == "model.fp8_block_size"
    with pytest.raises(ConfigError) as e:
        replace(cfg, n_routed_experts=0, num_experts_per_tok=0, moe_intermediate_size=0)
    assert e.value.key == "expert_dtype"
