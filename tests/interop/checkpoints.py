"""Tiny HF model directories written by the tests: transformers' own `save_pretrained` layout, and
DeepSeek-V3's released layout (per-expert tensors, FP8 with block scales, the MTP layer)."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import torch
from safetensors.numpy import save_file

from r1jax.model import fp8
from tests.model.test_hf_parity import _build, _deepseek, _randomize

BLOCK = (16, 16)  # small blocks, so the tiny shapes have several, with partial edge blocks
# Stored FP8 in the release: every attention, dense-MLP, expert and shared-expert projection.
FP8_PROJECTIONS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                   "gate_proj", "up_proj", "down_proj")


def tiny_v2(seed: int = 0):
    """A random transformers DeepseekV2 (V2-Lite's kind: softmax greedy routing, no q LoRA,
    unnormalised weights, 2 shared experts, YaRN with mscale)."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.DeepseekV2Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16,
        qk_rope_head_dim=16, v_head_dim=12, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2,
        first_k_dense_replace=1, topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
        norm_topk_prob=False, max_position_embeddings=256, attn_implementation="eager",
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64,
                             mscale=0.707, mscale_all_dim=0.707, beta_fast=32.0, beta_slow=1.0))
    model = tf.DeepseekV2ForCausalLM(cfg)
    _randomize(model, seed)
    return model.eval()


def save_transformers(name: str, directory: Path, shard_size: str = "30KB"):
    """A random transformers model of test_hf_parity's CASES[name] (or "deepseek_v2") saved in
    >= 3 shards; returns it."""
    model = tiny_v2() if name == "deepseek_v2" else _build(name)
    model.save_pretrained(directory, max_shard_size=shard_size)
    return model


def tiny_v3(seed: int = 0):
    """A random transformers DeepseekV3 whose shapes are not multiples of `BLOCK` (partial blocks):
    expert hidden 24, latent 28 (kv_a_proj rows 44), q LoRA 24; groups, YaRN, a shared expert."""
    torch.manual_seed(seed)
    model = _deepseek(moe_intermediate_size=24, kv_lora_rank=28, intermediate_size=72,
                      rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                           original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=1.0))
    _randomize(model, seed)
    return model.eval()


def released_tensors(model, mtp_seed: int = 7) -> dict[str, np.ndarray]:
    """The model's tensors renamed into the released V3 layout, f32, with one random MTP layer
    (`model.layers.{L}.*`: enorm, hnorm, eh_proj, shared_head.*, embed copy, a full MoE block)."""
    cfg = model.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    out = {}
    for name, w in sd.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix, f = name[: -len("gate_up_proj")], w.shape[1] // 2
            for j in range(w.shape[0]):
                out[f"{prefix}{j}.gate_proj.weight"] = w[j, :f]
                out[f"{prefix}{j}.up_proj.weight"] = w[j, f:]
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for j in range(w.shape[0]):
                out[f"{prefix}{j}.down_proj.weight"] = w[j]
        else:
            out[name] = w
    rng = np.random.default_rng(mtp_seed)
    last, mtp = cfg.num_hidden_layers - 1, f"model.layers.{cfg.num_hidden_layers}."
    for name in [n for n in out if n.startswith(f"model.layers.{last}.")]:
        w = out[name]
        noise = rng.standard_normal(w.shape).astype(np.float32)
        out[mtp + name[len(f"model.layers.{last}."):]] = 1 + 0.1 * noise if "norm" in name else noise * w.std()
    d = cfg.hidden_size
    out[mtp + "enorm.weight"] = 1 + 0.1 * rng.standard_normal(d).astype(np.float32)
    out[mtp + "hnorm.weight"] = 1 + 0.1 * rng.standard_normal(d).astype(np.float32)
    out[mtp + "eh_proj.weight"] = rng.standard_normal((d, 2 * d)).astype(np.float32) / (2 * d) ** 0.5
    out[mtp + "shared_head.norm.weight"] = 1 + 0.1 * rng.standard_normal(d).astype(np.float32)
    out[mtp + "embed_tokens.weight"] = out["model.embed_tokens.weight"]
    out[mtp + "shared_head.head.weight"] = out["lm_head.weight"]
    return out


def quantize_released(tensors: dict[str, np.ndarray], block=BLOCK) -> dict[str, np.ndarray]:
    """Projections -> FP8 + `weight_scale_inv`; norms, embeddings, router, eh_proj and head -> bf16
    (the router's correction bias stays f32), as in the released files."""
    out = {}
    for name, w in tensors.items():
        parts = name.split(".")
        if len(parts) > 2 and parts[-2] in FP8_PROJECTIONS and "shared_head" not in name:
            out[name], out[name + "_scale_inv"] = fp8.quantize(w, block)
        elif name.endswith("e_score_correction_bias"):
            out[name] = w
        else:
            out[name] = w.astype(ml_dtypes.bfloat16)
    return out


def dequantized(stored: dict[str, np.ndarray], block=BLOCK) -> dict[str, np.ndarray]:
    """What the stored tensors mean, in f32 (the reference's weights)."""
    out = {}
    for name, w in stored.items():
        if name.endswith("_scale_inv"):
            continue
        out[name] = fp8.dequantize(w, stored[name + "_scale_inv"], block) if w.dtype == fp8.FP8 else w.astype(np.float32)
    return out


def write_dir(directory: Path, tensors: dict[str, np.ndarray], config: dict, shards: int = 3) -> Path:
    """`tensors` in `shards` files with an index, and `config` as config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    groups = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: np.ascontiguousarray(tensors[n]) for n in group}, directory / file)
        weight_map.update(dict.fromkeys(group, file))
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def released_config(model, block=BLOCK) -> dict:
    cfg = model.config.to_dict()
    cfg.update(architectures=["DeepseekV3ForCausalLM"], num_nextn_predict_layers=1,
               quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                    "weight_block_size": list(block)})
    return cfg


def load_into_transformers(model, tensors: dict[str, np.ndarray]):
    """`model` with its weights replaced by released-layout f32 `tensors` (experts fused back)."""
    sd = model.state_dict()
    new = {}
    for name in sd:
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            e = sd[name].shape[0]
            new[name] = np.stack([np.concatenate([tensors[f"{prefix}{j}.gate_proj.weight"],
                                                  tensors[f"{prefix}{j}.up_proj.weight"]]) for j in range(e)])
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            new[name] = np.stack([tensors[f"{prefix}{j}.down_proj.weight"] for j in range(sd[name].shape[0])])
        else:
            new[name] = tensors[name]
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in new.items()})
    return model
