"""Hugging Face <-> r1jax weights: the name mapping, and in-memory conversion from `transformers`.

The mapping is data: `Rule`s pair a few HF tensor names with a few r1jax parameter paths and
carry the reshape / transpose between them in both directions; `layout` places a list of rules
under each HF layer prefix and the r1jax stack (or MTP module) it fills. `to_ours` / `to_hf`
run that table over any tensor source, so the file-based safetensors converter reuses it with a
`get` that reads (and fp8-dequantizes) from disk.

    model = from_transformers(hf_model)            # DeepseekV3 / Qwen2 / Llama ForCausalLM
    sd = to_hf_state_dict(model)                   # transformers' in-memory layout, numpy

Layouts (HF `nn.Linear` stores [out, in]; r1jax stores [in, *out] with heads split out):
  q_proj / q_b_proj  [H*(N+R), D|Q]   -> wq / wq_b  [D|Q, H, N+R]
  kv_b_proj          [H*(N+V), L]     -> wkv_b_k [L, H, N] and wkv_b_v [L, H, V] (split per head)
  o_proj             [D, H*V]         -> wo [H, V, D]
  k_proj / v_proj    [G*K, D]         -> wk / wv [D, G, K];  biases [H*K] -> [H, K]
  experts, fused (transformers 5.x): gate_up_proj [E, 2F, D] (gate rows first), down_proj [E, D, F]
  experts, per expert (released files): experts.J.{gate,up}_proj.weight [F, D], down_proj [D, F]
                                    -> w_gate / w_up [E, D, F], w_down [E, F, D]
  mlp.gate.weight [E, D] -> gate [D, E];  e_score_correction_bias [E] -> bias (a RoutingBias)
  MTP depth k at model.layers.{num_hidden_layers + k}: enorm, hnorm, eh_proj [D, 2D] -> [2D, D],
  shared_head.norm -> norm, and a full block. Its copies of embed_tokens / shared_head.head are
  the shared embedding and head, so they map to nothing.

RoPE needs no permutation: r1jax rotates interleaved pairs in place, HF (`rope_interleave`)
rotates the same pairs and writes them out as halves; q and k are permuted alike, so q·k agrees.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Literal

import jax.numpy as jnp
import numpy as np
from flax import nnx

from r1jax.config import ModelConfig
from r1jax.config import model_config_from_hf as config_from_hf  # noqa: F401  (the interop name)
from r1jax.model.decoder import Decoder

Path = tuple[str | int, ...]
Experts = Literal["fused", "per_expert"]

@dataclasses.dataclass(frozen=True)
class Rule:
    """HF tensors `hf` (names under a layer prefix) <-> r1jax parameters `ours` (paths under the
    module the rule is placed on). `to_ours(*hf_arrays) -> tuple` in `ours` order; `to_hf` inverts it."""

    hf: tuple[str, ...]
    ours: tuple[Path, ...]
    to_ours: Callable[..., tuple[np.ndarray, ...]]
    to_hf: Callable[..., tuple[np.ndarray, ...]]
    kind: str = "plain"  # "per_expert": hf[j] is expert j's [out, in], ours[0] their stack [E, in, out]


def _xp(x):
    """NumPy for arrays, jax.numpy for tracers: `jax.eval_shape` runs the table for shapes alone."""
    return np if isinstance(x, np.ndarray) else jnp


def copy(hf: str, ours: Path) -> Rule:
    return Rule((hf,), (ours,), lambda w: (w,), lambda w: (w,))


def transposed(hf: str, ours: Path) -> Rule:
    """A 2-D weight stored [out, in] by HF and [in, out] here."""
    return Rule((hf,), (ours,), lambda w: (w.T,), lambda w: (w.T,))


def linear(hf: str, ours: Path, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Rule:
    """An `nn.Linear` weight [prod(out), prod(in)] <-> ours [*in, *out]."""
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    return Rule(
        (hf,), (ours,),
        lambda w: (w.T.reshape(*in_shape, *out_shape),),
        lambda w: (w.reshape(n_in, n_out).T,),
    )


def reshape(hf: str, ours: Path, shape: tuple[int, ...]) -> Rule:
    """A bias [prod(shape)] <-> ours [*shape]."""
    return Rule((hf,), (ours,), lambda w: (w.reshape(shape),), lambda w: (w.reshape(-1),))


def kv_b(hf: str, k_path: Path, v_path: Path, latent: int, heads: int, nope: int) -> Rule:
    """kv_b_proj [H*(N+V), L] <-> wkv_b_k [L, H, N] and wkv_b_v [L, H, V]."""

    def to_ours(w):
        w = w.T.reshape(latent, heads, -1)
        return w[..., :nope], w[..., nope:]

    def to_hf(k, v):
        return (_xp(k).concatenate([k, v], axis=-1).reshape(latent, -1).T,)

    return Rule((hf,), (k_path, v_path), to_ours, to_hf)


def fused_experts(gate_up: str, down: str, f: int) -> Rule:
    """gate_up_proj [E, 2F, D] (gate rows first), down_proj [E, D, F] <-> w_gate, w_up [E, D, F], w_down [E, F, D]."""

    def to_ours(gu, dn):
        return gu[:, :f].transpose(0, 2, 1), gu[:, f:].transpose(0, 2, 1), dn.transpose(0, 2, 1)

    def to_hf(g, u, dn):
        return _xp(g).concatenate([g, u], axis=-1).transpose(0, 2, 1), dn.transpose(0, 2, 1)

    return Rule((gate_up, down), (("ffn", "w_gate"), ("ffn", "w_up"), ("ffn", "w_down")), to_ours, to_hf)


def per_expert(proj: str, ours: Path, e: int) -> Rule:
    """experts.J.<proj>.weight [out, in] for J < E <-> ours [E, in, out]."""
    names = tuple(f"mlp.experts.{j}.{proj}.weight" for j in range(e))
    return Rule(
        names, (ours,),
        lambda *ws: (np.stack([w.T for w in ws]),),
        lambda w: tuple(x.T for x in w),
        kind="per_expert",
    )


def mlp_rules(hf_prefix: str, ours_prefix: Path) -> list[Rule]:
    """SwiGLU MLP: {gate,up,down}_proj; ours stores [in, out], so plain transposes."""
    return [transposed(f"{hf_prefix}{p}.weight", ours_prefix + (p,)) for p in ("gate_proj", "up_proj", "down_proj")]


def attention_rules(cfg: ModelConfig) -> list[Rule]:
    d, h = cfg.hidden_size, cfg.num_attention_heads
    a = "self_attn."
    if cfg.is_mla:
        n, r, v, lat = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        if cfg.q_lora_rank is None:
            rules = [linear(a + "q_proj.weight", ("attn", "wq"), (d,), (h, n + r))]
        else:
            q = cfg.q_lora_rank
            rules = [
                linear(a + "q_a_proj.weight", ("attn", "wq_a"), (d,), (q,)),
                copy(a + "q_a_layernorm.weight", ("attn", "q_norm", "weight")),
                linear(a + "q_b_proj.weight", ("attn", "wq_b"), (q,), (h, n + r)),
            ]
        return rules + [
            linear(a + "kv_a_proj_with_mqa.weight", ("attn", "wkv_a"), (d,), (lat + r,)),
            copy(a + "kv_a_layernorm.weight", ("attn", "kv_norm", "weight")),
            kv_b(a + "kv_b_proj.weight", ("attn", "wkv_b_k"), ("attn", "wkv_b_v"), lat, h, n),
            linear(a + "o_proj.weight", ("attn", "wo"), (h, v), (d,)),
        ]
    g, k = cfg.kv_heads, cfg.gqa_head_dim
    rules = [
        linear(a + "q_proj.weight", ("attn", "wq"), (d,), (h, k)),
        linear(a + "k_proj.weight", ("attn", "wk"), (d,), (g, k)),
        linear(a + "v_proj.weight", ("attn", "wv"), (d,), (g, k)),
        linear(a + "o_proj.weight", ("attn", "wo"), (h, k), (d,)),
    ]
    if cfg.qkv_bias or cfg.attention_bias:
        rules += [
            reshape(a + "q_proj.bias", ("attn", "bq"), (h, k)),
            reshape(a + "k_proj.bias", ("attn", "bk"), (g, k)),
            reshape(a + "v_proj.bias", ("attn", "bv"), (g, k)),
        ]
    if cfg.attention_bias:
        rules.append(copy(a + "o_proj.bias", ("attn", "bo")))
    return rules


def block_rules(cfg: ModelConfig, *, moe: bool, experts: Experts = "fused") -> list[Rule]:
    """The rules of one decoder layer, names relative to `model.layers.N.` and to a `Block`."""
    rules = [
        copy("input_layernorm.weight", ("input_norm", "weight")),
        copy("post_attention_layernorm.weight", ("post_attn_norm", "weight")),
        *attention_rules(cfg),
    ]
    if not moe:
        return rules + mlp_rules("mlp.", ("ffn",))
    e, f = cfg.n_routed_experts, cfg.moe_intermediate_size
    rules.append(transposed("mlp.gate.weight", ("ffn", "gate")))
    if cfg.topk_method == "noaux_tc":
        rules.append(copy("mlp.gate.e_score_correction_bias", ("ffn", "bias")))
    if experts == "fused":
        rules.append(fused_experts("mlp.experts.gate_up_proj", "mlp.experts.down_proj", f))
    else:
        rules += [
            per_expert("gate_proj", ("ffn", "w_gate"), e),
            per_expert("up_proj", ("ffn", "w_up"), e),
            per_expert("down_proj", ("ffn", "w_down"), e),
        ]
    if cfg.n_shared_experts:
        rules += mlp_rules("mlp.shared_experts.", ("ffn", "shared"))
    return rules


def mtp_rules(cfg: ModelConfig, experts: Experts = "fused") -> list[Rule]:
    """One MTP depth, names relative to `model.layers.{num_hidden_layers + k}.` and to an `MTPLayer`."""
    nested = [
        dataclasses.replace(r, ours=tuple(("block",) + p for p in r.ours))
        for r in block_rules(cfg, moe=cfg.is_moe, experts=experts)
    ]
    return [
        copy("enorm.weight", ("enorm", "weight")),
        copy("hnorm.weight", ("hnorm", "weight")),
        transposed("eh_proj.weight", ("eh_proj",)),  # [D, 2D] <-> [2D, D], embedding half first
        copy("shared_head.norm.weight", ("norm", "weight")),
        *nested,
    ]


@dataclasses.dataclass(frozen=True)
class Placement:
    """`rules` applied under HF prefix `hf_prefix` and r1jax module `ours_prefix`; `index` is the
    position on that module's stacked layers axis (None: the module is not stacked)."""

    hf_prefix: str
    ours_prefix: Path
    index: int | None
    rules: list[Rule]


def layout(cfg: ModelConfig, *, experts: Experts = "fused", mtp: bool = False) -> list[Placement]:
    """Every HF tensor of a checkpoint of `cfg`, where it goes in r1jax and how.

    `mtp`: include the MTP modules (released checkpoints have them; transformers' models do not).
    """
    top = [copy("model.embed_tokens.weight", ("embed",)), copy("model.norm.weight", ("norm", "weight"))]
    if not cfg.tie_word_embeddings:
        top.append(transposed("lm_head.weight", ("lm_head",)))
    out = [Placement("", (), None, top)]
    dense = block_rules(cfg, moe=False, experts=experts)
    moe = block_rules(cfg, moe=True, experts=experts) if cfg.is_moe else []
    for i in range(cfg.num_hidden_layers):
        if i < cfg.num_dense_layers:
            out.append(Placement(f"model.layers.{i}.", ("dense_layers",), i, dense))
        else:
            out.append(Placement(f"model.layers.{i}.", ("moe_layers",), i - cfg.num_dense_layers, moe))
    if mtp:
        rules = mtp_rules(cfg, experts)
        for k in range(cfg.num_nextn_predict_layers):
            out.append(Placement(f"model.layers.{cfg.num_hidden_layers + k}.", ("mtp", k), None, rules))
    return out


def hf_names(cfg: ModelConfig, *, experts: Experts = "fused", mtp: bool = False) -> list[str]:
    """All HF tensor names `layout` reads (the tied lm_head and MTP copies of shared tensors excluded)."""
    return [p.hf_prefix + n for p in layout(cfg, experts=experts, mtp=mtp) for r in p.rules for n in r.hf]


# ----------------------------------------------------------------------------- running the table


def to_ours(get: Callable[[str], np.ndarray], cfg: ModelConfig, *, experts: Experts = "fused",
            mtp: bool = False) -> dict[Path, np.ndarray]:
    """HF tensors, read one by one through `get(name)`, -> {r1jax parameter path: array}.

    Parameters of a stacked layer module come back stacked on their leading layers axis.
    """
    flat: dict[Path, np.ndarray] = {}
    stacks: dict[Path, list[np.ndarray]] = {}
    for place in layout(cfg, experts=experts, mtp=mtp):
        for rule in place.rules:
            arrays = rule.to_ours(*(get(place.hf_prefix + n) for n in rule.hf))
            for path, arr in zip(rule.ours, arrays, strict=True):
                full = place.ours_prefix + path
                if place.index is None:
                    flat[full] = arr
                else:
                    stack = stacks.setdefault(full, [])
                    assert len(stack) == place.index, (full, len(stack), place.index)
                    stack.append(arr)
    flat.update({path: np.stack(layers) for path, layers in stacks.items()})
    return flat


def to_hf(params: dict[Path, np.ndarray], cfg: ModelConfig, *, experts: Experts = "fused",
          mtp: bool = False) -> dict[str, np.ndarray]:
    """{r1jax parameter path: array} (as `to_ours` returns) -> {HF tensor name: array}."""
    out: dict[str, np.ndarray] = {}
    for place in layout(cfg, experts=experts, mtp=mtp):
        for rule in place.rules:
            arrays = []
            for path in rule.ours:
                arr = params[place.ours_prefix + path]
                arrays.append(arr if place.index is None else arr[place.index])
            for name, arr in zip(rule.hf, rule.to_hf(*arrays), strict=True):
                out[place.hf_prefix + name] = np.ascontiguousarray(arr)
    return out


def variable(model: nnx.Module, path: Path) -> nnx.Variable:
    """The `nnx.Variable` (Param or RoutingBias) at `path` under `model`."""
    node: Any = model
    for p in path:
        node = node[p] if isinstance(p, int) else getattr(node, p)
    if not isinstance(node, nnx.Variable):
        raise KeyError(f"{'.'.join(map(str, path))} is not a variable of {type(model).__name__}")
    return node


def load_params(model: nnx.Module, params: dict[Path, np.ndarray]) -> None:
    """Writes arrays into `model` in place, cast to each variable's dtype; shapes must agree."""
    for path, arr in params.items():
        var = variable(model, path)
        old = var.get_value()
        if tuple(arr.shape) != tuple(old.shape):
            raise ValueError(f"{'.'.join(map(str, path))}: shape {tuple(arr.shape)} != model's {tuple(old.shape)}")
        var.set_value(jnp.asarray(arr, dtype=old.dtype))


def model_params(model: nnx.Module, paths: Iterable[Path]) -> dict[Path, np.ndarray]:
    return {p: np.asarray(variable(model, p).get_value()) for p in paths}


# ----------------------------------------------------------------------------- transformers


def detect_experts(names: Iterable[str]) -> Experts:
    return "fused" if any(n.endswith("mlp.experts.gate_up_proj") for n in names) else "per_expert"


def from_transformers(hf_model, *, seed: int = 0, **config_overrides) -> Decoder:
    """A `transformers` causal LM (DeepseekV3 / Qwen2 / Llama) -> an r1jax `Decoder` with its weights.

    Reads `hf_model.config`, builds the Decoder (float32 unless overridden) and copies
    `hf_model.state_dict()` in. Parameters HF lacks (the MTP modules) keep their init from `seed`.
    Raises if a tensor of the state dict is left unused or one the model needs is missing.
    """
    import torch

    cfg = config_from_hf(hf_model.config.to_dict(), **config_overrides)
    state = {k: v.detach().to("cpu", torch.float32).numpy() for k, v in hf_model.state_dict().items()}
    experts = detect_experts(state)
    used: set[str] = set()

    def get(name: str) -> np.ndarray:
        if name not in state:
            raise KeyError(f"{name}: not in the transformers state dict")
        used.add(name)
        return state[name]

    params = to_ours(get, cfg, experts=experts)
    ignored = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    left = sorted(set(state) - used - ignored)
    if left:
        raise ValueError(f"{len(left)} transformers tensors have no r1jax place: {left[:8]}")
    return build_with(cfg, params, seed=seed)


def build_with(cfg: ModelConfig, params: dict[Path, np.ndarray], *, seed: int = 0) -> Decoder:
    """A `Decoder` holding `params`. Built abstractly (nothing allocated twice) when `params` covers
    every variable; otherwise initialised from `seed` and then overwritten."""
    make = lambda: Decoder(cfg, rngs=nnx.Rngs(seed))  # noqa: E731
    model = nnx.eval_shape(make)
    every = {tuple(path) for path, _ in nnx.to_flat_state(nnx.state(model))}
    if not every <= set(params):
        model = make()
    load_params(model, params)
    return model


def _param_paths(cfg: ModelConfig, experts: Experts, mtp: bool) -> list[Path]:
    return [p.ours_prefix + path for p in layout(cfg, experts=experts, mtp=mtp) for r in p.rules for path in r.ours]


def to_hf_state_dict(model: Decoder, *, experts: Experts = "fused", mtp: bool = False,
                     tied_head: bool = True) -> dict[str, np.ndarray]:
    """An r1jax `Decoder` -> {HF name: numpy array}, transformers' in-memory layout by default.

    `experts="per_expert"` and `mtp=True` give the released-checkpoint names instead. A tied
    model also gets `lm_head.weight` (= the embedding) when `tied_head`, as transformers' state
    dict has it (released files of tied models do not: pass False).
    """
    cfg = model.cfg
    paths = _param_paths(cfg, experts, mtp)
    out = to_hf(model_params(model, dict.fromkeys(paths)), cfg, experts=experts, mtp=mtp)
    if cfg.tie_word_embeddings and tied_head:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


# ----------------------------------------------------------------------------- the notebook API


def load(path, *, mesh=None, dtype: str | None = None, **overrides):
    """(model, tokenizer) from an HF model directory (streamed, FP8 dequantized; see
    `r1jax.interop.hf_dir`) or an r1jax params export / run dir. `mesh`: place the weights by the
    sharding table on it; `dtype`: compute and parameter dtype (default: float32 for HF
    directories, the saved config's for exports); `overrides`: model fields (e.g.
    `expert_dtype="float8_e4m3fn"`). The tokenizer is None when no tokenizer files are found.

        model, tokenizer = load("DeepSeek-R1-Distill-Qwen-1.5B", dtype="bfloat16")
        logits = model(ids).logits
    """
    import dataclasses
    from pathlib import Path

    import jax

    from r1jax import checkpoint as ckpt_lib
    from r1jax.config import build
    from r1jax.data.tokenizer import find_tokenizer
    from r1jax.interop import hf_dir
    from r1jax.interop.safetensors_files import is_hf_dir

    places = [path, Path(path).parent]
    if is_hf_dir(path):
        model = hf_dir.load_model(path, mesh=mesh, dtype=dtype, **overrides)
    else:
        overrides = {**hf_dir.dtype_fields(dtype), **overrides}
        meta = ckpt_lib.read_meta(path)
        cfg = dataclasses.replace(build(ModelConfig, meta["config"]["model"], "model"), **overrides)
        graphdef, target = hf_dir.abstract_model(cfg, mesh)
        if mesh is None:
            target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), target)
        params, extra = nnx.split(nnx.merge(graphdef, target), nnx.Param, ...)[1:]
        params, extra = ckpt_lib.load_params(path, (params, extra))
        model = nnx.merge(graphdef, params, extra)
        places.append(meta.get("tokenizer"))
    return model, find_tokenizer(places)
