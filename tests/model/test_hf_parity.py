"""r1jax against `transformers` (torch, CPU, f32, eager attention): logits of tiny random models.

Every HF tensor is re-drawn at a useful scale (HF's init leaves the router and the correction
bias at zero and norms at one, which would hide routing, bias and norm-mapping bugs), then the
model goes through `r1jax.interop.hf.from_transformers` and both run the same random ids.
"""

import chex
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx

from r1jax.interop import hf as hfi
from r1jax.model.decoder import Decoder

B, T, VOCAB = 2, 12, 128
TOL = 1e-4

YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64,
            beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
LLAMA3 = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=8192)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights ~ N(0, 1/fan_in) (fan_in = last dim), embedding N(0, 1), norms 1 + N(0, .1²),
    biases (q/k/v, e_score_correction_bias) N(0, .1²)... all non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            noise = torch.randn(t.shape, generator=g, dtype=torch.float32)
            if name.endswith("embed_tokens.weight"):
                t.copy_(noise)
            elif t.ndim >= 2:
                t.copy_(noise / t.shape[-1] ** 0.5)
            elif "norm" in name:
                t.copy_(1.0 + 0.1 * noise)
            elif name.endswith("e_score_correction_bias"):
                t.copy_(0.1 * noise)
            else:  # linear biases
                t.copy_(0.5 * noise)


def _deepseek(**kw) -> tf.DeepseekV3ForCausalLM:
    base = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=24,
        qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=12,
        n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1, n_group=4, topk_group=2,
        first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0), max_position_embeddings=256,
        num_mtp_layers=0, tie_word_embeddings=False,
    )
    base.update(kw)
    return tf.DeepseekV3ForCausalLM(tf.DeepseekV3Config(**base, attn_implementation="eager"))


def _dense(cls_cfg, cls_model, **kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768)
    base.update(kw)
    return cls_model(cls_cfg(**base, attn_implementation="eager"))


CASES = {
    # groups on, q LoRA, YaRN (ramp over rope dims 0..3 with L0=64), nonzero bias, 1 shared expert
    "dsv3_groups_qlora_yarn": lambda: _deepseek(rope_parameters=YARN),
    # groups off, plain q projection, no scaling, 2 shared experts, unnormalised weights
    "dsv3_nogroups_noqlora": lambda: _deepseek(n_group=1, topk_group=1, q_lora_rank=None, n_shared_experts=2,
                                               norm_topk_prob=False, routed_scaling_factor=1.0),
    # half-rotation RoPE weights, tied head, two dense layers first
    "dsv3_halfrope_tied": lambda: _deepseek(rope_interleave=False, tie_word_embeddings=True, rope_parameters=YARN,
                                            first_k_dense_replace=2),
    "qwen2": lambda: _dense(tf.Qwen2Config, tf.Qwen2ForCausalLM),
    "qwen2_tied": lambda: _dense(tf.Qwen2Config, tf.Qwen2ForCausalLM, tie_word_embeddings=True),
    "llama": lambda: _dense(tf.LlamaConfig, tf.LlamaForCausalLM, rope_parameters=dict(rope_type="default",
                                                                                        rope_theta=10000.0)),
    "llama3_rope_tied": lambda: _dense(tf.LlamaConfig, tf.LlamaForCausalLM, rope_parameters=LLAMA3,
                                       tie_word_embeddings=True),
}


@nnx.jit
def _logits(model, ids):
    return model(ids).logits


def _build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = CASES[name]()
    _randomize(model, seed)
    return model.eval()


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(name):
    hf_model = _build(name)
    ids = np.random.default_rng(1).integers(0, VOCAB, size=(B, T))
    with torch.no_grad():
        want = hf_model(torch.as_tensor(ids)).logits.numpy()
    model = hfi.from_transformers(hf_model)
    got = np.asarray(_logits(model, jnp.asarray(ids, jnp.int32)))
    assert got.shape == (B, T, VOCAB)
    err = np.abs(got - want).max()
    print(f"{name}: max |logit diff| = {err:.3g} (logits scale {np.abs(want).max():.3g})")
    assert err <= TOL, err


def test_config_mapping():
    cfg = hfi.from_transformers(_build("dsv3_groups_qlora_yarn")).cfg
    assert cfg.is_mla and cfg.is_moe and cfg.num_dense_layers == 1 and cfg.num_moe_layers == 2
    assert (cfg.n_group, cfg.topk_group, cfg.q_lora_rank, cfg.rope_interleave) == (4, 2, 24, True)
    assert cfg.rope_scaling.type == "yarn" and cfg.rope_scaling.factor == 4.0 and cfg.dtype == "float32"
    cfg = hfi.from_transformers(_build("qwen2_tied")).cfg
    assert cfg.qkv_bias and not cfg.attention_bias and not cfg.rope_interleave and cfg.tie_word_embeddings
    assert cfg.kv_heads == 2 and cfg.gqa_head_dim == 16


@pytest.mark.parametrize("name", ["dsv3_groups_qlora_yarn", "dsv3_halfrope_tied", "qwen2", "llama3_rope_tied"])
def test_round_trip_state_dict(name):
    hf_model = _build(name)
    want = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    got = hfi.to_hf_state_dict(hfi.from_transformers(hf_model))
    assert sorted(got) == sorted(want)
    chex.assert_trees_all_equal(got, want)


def test_released_layout_round_trip():
    """Per-expert names and MTP (`model.layers.{L+k}.*`) map onto the same parameters and back."""
    cfg = hfi.config_from_hf(_build("dsv3_groups_qlora_yarn").config.to_dict(), num_nextn_predict_layers=1)
    # Random values without Decoder's init (its per-shape threefry compiles cost a minute on 2 cores).
    abstract = nnx.state(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(3)
    model = hfi.build_with(cfg, {
        tuple(path): rng.standard_normal(v.shape).astype(np.float32) for path, v in nnx.to_flat_state(abstract)
    })
    sd = hfi.to_hf_state_dict(model, experts="per_expert", mtp=True)
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in sd and "model.layers.3.eh_proj.weight" in sd
    assert "model.layers.3.mlp.experts.0.gate_proj.weight" in sd and "model.layers.3.shared_head.norm.weight" in sd
    assert sd["model.layers.1.mlp.experts.7.down_proj.weight"].shape == (64, 32)
    assert sd["model.layers.3.eh_proj.weight"].shape == (64, 128)
    assert sorted(sd) == sorted(hfi.hf_names(cfg, experts="per_expert", mtp=True))
    fused = hfi.to_hf_state_dict(model)
    gu = fused["model.layers.2.mlp.experts.gate_up_proj"]
    np.testing.assert_array_equal(gu[5, :32], sd["model.layers.2.mlp.experts.5.gate_proj.weight"])
    np.testing.assert_array_equal(gu[5, 32:], sd["model.layers.2.mlp.experts.5.up_proj.weight"])
    params = hfi.to_ours(sd.__getitem__, cfg, experts="per_expert", mtp=True)
    fresh = hfi.build_with(cfg, params)
    chex.assert_trees_all_equal(hfi.to_hf_state_dict(fresh, experts="per_expert", mtp=True), sd)


def test_yarn_without_mscale_matches_transformers():
    torch.manual_seed(0)
    hf_model = _deepseek(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                              original_max_position_embeddings=64))
    _randomize(hf_model, 0)
    ids = np.random.default_rng(1).integers(0, VOCAB, size=(B, T))
    with torch.no_grad():
        want = hf_model.eval()(torch.as_tensor(ids)).logits.numpy()
    got = np.asarray(_logits(hfi.from_transformers(hf_model), jnp.asarray(ids, jnp.int32)))
    assert np.abs(got - want).max() <= TOL
