"""The training attention kernels against the XLA path and a NumPy formula: Pallas splash
attention in interpret mode (the TPU kernel's own code, run on CPU), the cuDNN call's plumbing
(same `jax.nn.dot_product_attention` call, XLA implementation), sharded splash under the rules
table, and a whole MLA decoder switched by `model.attention_impl`."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dataclasses

from r1jax.config import MeshConfig, ModelConfig
from r1jax.model.attention_kernels import attention_fn, cudnn_attend, kernel_table, resolve_attention_impl, splash_attend
from r1jax.model.decoder import Decoder
from r1jax.model.layers import causal_attend
from r1jax.parallel import mesh as mesh_lib
from r1jax.parallel.rules import rules_for, use_rules

B, T, H, K, V = 2, 136, 4, 24, 16  # MLA-like: k wider than v; T not a multiple of the 128 tile
SCALE = K**-0.5


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    q, k = (rng.standard_normal((B, T, H, K)).astype(np.float32) for _ in range(2))
    v = rng.standard_normal((B, T, H, V)).astype(np.float32)
    # Row 0: three packed documents and padding (segment 0); row 1: one document.
    seg = np.stack([np.repeat([1, 2, 3, 0], [50, 40, 30, 16]), np.ones(T, int)]).astype(np.int32)
    return q, k, v, seg


def _numpy_attention(q, k, v, seg):
    logits = np.einsum("bthk,bshk->bhts", q.astype(np.float64), k) * SCALE
    visible = (np.arange(T)[:, None] >= np.arange(T)[None]) & (seg[:, :, None] == seg[:, None, :])[:, None]
    logits = np.where(visible, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhts,bshv->bthv", p / p.sum(-1, keepdims=True), v)


def _loss(fn, seg):
    # A fixed random cotangent: gradients that depend on every output element.
    w = jnp.asarray(np.random.default_rng(7).standard_normal((B, T, H, V)), jnp.float32)
    return lambda q, k, v: jnp.sum(fn(q, k, v, jnp.asarray(seg), SCALE) * w)


@pytest.mark.parametrize("name", ["splash", "cudnn"])
def test_kernel_matches_xla_path_forward_and_gradients(name):
    q, k, v, seg = _inputs()
    fn = splash_attend if name == "splash" else (lambda *a: cudnn_attend(*a, implementation="xla"))
    out = jax.jit(fn, static_argnums=4)(q, k, v, jnp.asarray(seg), SCALE)
    chex.assert_shape(out, (B, T, H, V))
    np.testing.assert_allclose(np.asarray(out), _numpy_attention(q, k, v, seg), atol=2e-6, rtol=1e-5)
    ref = jax.jit(jax.grad(_loss(causal_attend, seg), argnums=(0, 1, 2)))(q, k, v)
    got = jax.jit(jax.grad(_loss(fn, seg), argnums=(0, 1, 2)))(q, k, v)
    scale = max(float(jnp.abs(g).max()) for g in ref)
    chex.assert_trees_all_close(got, ref, atol=1e-5 * scale, rtol=0)


def test_splash_sharded_under_rules_equals_single_device():
    """Batch over data, heads over model: the kernel runs per device in a shard_map."""
    q, k, v, seg = _inputs(1)
    mesh = mesh_lib.make_mesh(MeshConfig(data=2, expert=1, model=4))
    f = jax.jit(jax.value_and_grad(_loss(splash_attend, seg), argnums=(0, 1, 2)))
    with use_rules(mesh, rules_for(fsdp=False)):
        sharded = f(q, k, v)
    single = jax.jit(jax.value_and_grad(_loss(causal_attend, seg), argnums=(0, 1, 2)))(q, k, v)
    scale = max(float(jnp.abs(g).max()) for g in single[1])
    chex.assert_trees_all_close(sharded, single, atol=1e-5 * scale, rtol=1e-5)


def test_decoder_switched_by_config():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8,
                      qk_rope_head_dim=8, v_head_dim=8)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (1, 40)), jnp.int32)
    positions = jnp.arange(40)[None]
    segments = jnp.asarray(np.repeat([1, 2], [25, 15])[None], jnp.int32)

    def logits(impl):
        model = Decoder(dataclasses.replace(cfg, attention_impl=impl), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        return jax.jit(lambda s: nnx.merge(graphdef, s)(tokens, positions, segments).logits)(state)

    chex.assert_trees_all_close(logits("splash"), logits("xla"), atol=1e-5, rtol=1e-5)


def test_auto_picks_by_backend():
    assert resolve_attention_impl("auto") == "xla"  # the tests run on CPU
    assert resolve_attention_impl("splash") == "splash"
    assert attention_fn("auto") is causal_attend
    assert kernel_table("auto") == {"attention": "xla"}


def test_auto_on_gpu_falls_back_when_cudnn_refuses_the_shapes(monkeypatch):
    from r1jax.model import attention_kernels

    def refuse(*args, **kwargs):
        raise NotImplementedError("The head dim must be <= 128")

    monkeypatch.setattr(attention_kernels, "backend", lambda: "gpu")
    monkeypatch.setattr(jax.nn, "dot_product_attention", refuse)
    q, k, v, seg = _inputs(2)
    out = attention_fn("auto")(q, k, v, jnp.asarray(seg), SCALE)
    np.testing.assert_allclose(np.asarray(out), _numpy_attention(q, k, v, seg), atol=2e-6, rtol=1e-5)
    with pytest.raises(NotImplementedError):
        attention_fn("cudnn")(q, k, v, jnp.asarray(seg), SCALE)
