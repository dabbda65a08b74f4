"""Shared helpers of the sampling tests: tiny random models filled from NumPy (no random-init
compiles), and the full-forward reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from r1jax.config import load_model
from r1jax.model.decoder import Decoder


def materialise(cfg, seed: int = 0) -> Decoder:
    """Weights N(0, 1/fan_in) (the second-to-last dim; stacked layers and experts lead), an
    N(0, 1) embedding, norms near 1, a small routing bias: logits of a useful scale, so greedy
    ties are rare."""
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def fill(path, leaf):
        name = "/".join(str(getattr(p, "key", p)) for p in path).removesuffix("/.value")
        if name.endswith("norm/weight"):
            value = 1.0 + rng.normal(0, 0.1, leaf.shape)
        elif name == "embed":
            value = rng.normal(0, 1.0, leaf.shape)
        elif name.endswith(("bq", "bk", "bv", "bo")):
            value = rng.normal(0, 0.1, leaf.shape)
        else:
            fan_in = leaf.shape[-2] if len(leaf.shape) >= 2 else leaf.shape[-1]
            if name.endswith(("wq", "wk", "wv", "wkv_b_k", "wkv_b_v", "wq_b")):
                fan_in = leaf.shape[-3]
            elif name.endswith("wo"):
                fan_in = leaf.shape[-3] * leaf.shape[-2]
            value = rng.normal(0, fan_in**-0.5, leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    params = jax.tree_util.tree_map_with_path(fill, params)
    rest = jax.tree.map(lambda b: jnp.asarray(rng.uniform(-0.02, 0.02, b.shape), b.dtype), rest)
    return nnx.merge(graphdef, params, rest)


@functools.cache
def tiny_moe(layers: int = 3) -> Decoder:
    """configs/model/tiny-moe.yaml, f32: 1 dense + (layers - 1) MoE layers, MTP depth 1."""
    return materialise(load_model("configs/model/tiny-moe.yaml", f"num_hidden_layers={layers}"), seed=0)


@functools.cache
def tiny_gqa() -> Decoder:
    """A Qwen2-like dense student (GQA with q/k/v bias, half-rotation RoPE), f32."""
    cfg = load_model("configs/model/r1-distill-qwen-1.5b.yaml", "vocab_size=512", "hidden_size=64",
                     "num_hidden_layers=2", "num_attention_heads=4", "num_key_value_heads=2",
                     "intermediate_size=128", "dtype=float32")
    return materialise(cfg, seed=1)


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids).logits


def full_logits(model: Decoder, seqs: list[list[int]], length: int) -> np.ndarray:
    """Decoder.__call__ on each whole sequence, right-padded to `length` (causal: padding never
    reaches back) -> [B, length, V]."""
    ids = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    return np.asarray(_logits(*nnx.split(model), jnp.asarray(ids)))


def prompts(cfg, lengths, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, cfg.vocab_size, n).tolist() for n in lengths]
