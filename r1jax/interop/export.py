"""An r1jax model -> a Hugging Face model directory that `transformers` loads, with the same logits.

    python -m r1jax.interop.export RUN_OR_PARAMS_DIR HF_OUT_DIR [dtype=bfloat16|float32]
        [max_shard_size=5GB] [experts=fused|per_expert] [mtp=false] [overwrite=false] [tokenizer=PATH|none]

    export(model, "hf/", tokenizer="runs/tiny")                     # a Decoder, from Python

RUN_OR_PARAMS_DIR: a training run dir (its newest readable checkpoint), a checkpoints dir, or
params written by `r1jax.checkpoint.export_params`; the model is rebuilt from the config saved
in its meta. The directory gets config.json (`hf_config`, the inverse of `config_from_hf`), the
weights as `model.safetensors` or as `model-0000i-of-0000N.safetensors` shards of at most
`max_shard_size` with `model.safetensors.index.json`, and the run's tokenizer files. Weights go
through the name table of `r1jax.interop.hf` one rule at a time, straight into the shard being
filled, so host memory beyond the model is about one shard. Everything is written into
`HF_OUT_DIR.tmp-<pid>` and renamed into place when complete.

`mtp=true` also writes the MTP modules under `model.layers.{num_hidden_layers + k}` (the released
DeepSeek-V3 layout); transformers has no MTP module and leaves them unused (a load-report note).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from r1jax.config import ModelConfig
from r1jax.interop.hf import Experts, layout, variable
from r1jax.model.decoder import Decoder

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
STORAGE_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
# The router stays float32 whatever `dtype`: r1jax and transformers both route in float32
# (transformers' `_keep_in_fp32_modules_strict`), and rounding it can flip expert choices.
FLOAT32_SUFFIXES = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")
# How r1jax runs a model, not what the model is: not in config.json (`config_from_hf` takes them as overrides).
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "scan_unroll", "expert_dtype", "fp8_block_size")
ARCHITECTURES = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


# ----------------------------------------------------------------------------- config.json


def hf_model_type(cfg: ModelConfig) -> str:
    """The transformers model type that computes what `cfg` computes; raises when none does."""
    if cfg.is_mla:
        if not cfg.is_moe or cfg.topk_method == "noaux_tc":
            return "deepseek_v3"
        problems = [p for bad, p in (
            (cfg.scoring_func != "softmax", f"scoring_func={cfg.scoring_func} (it scores by softmax)"),
            (cfg.norm_topk_prob, "norm_topk_prob=true (it never renormalises the top-k weights)"),
            (not cfg.rope_interleave, "rope_interleave=false (it rotates interleaved pairs)"),
        ) if bad]
        if problems:
            raise ValueError(f"topk_method={cfg.topk_method} routing is DeepSeek-V2's, and transformers' "
                             f"deepseek_v2 cannot express {'; '.join(problems)}")
        return "deepseek_v2"
    if cfg.rope_interleave:
        raise ValueError("rope_interleave=true with GQA attention: transformers' Llama and Qwen2 rotate halves")
    return "qwen2" if cfg.qkv_bias and not cfg.attention_bias else "llama"


def _rope(cfg: ModelConfig) -> dict[str, Any]:
    """`rope_parameters` (transformers 5) and the `rope_theta` / `rope_scaling` pair older readers take."""
    scaling = cfg.rope_scaling
    if scaling is None:
        return {"rope_theta": cfg.rope_theta, "rope_scaling": None,
                "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}}
    keys = (("beta_fast", "beta_slow", "mscale", "mscale_all_dim") if scaling.type == "yarn"
            else ("low_freq_factor", "high_freq_factor"))
    fields = {k: getattr(scaling, k) for k in ("factor", "original_max_position_embeddings", *keys)}
    return {"rope_theta": cfg.rope_theta,
            "rope_scaling": {"type": scaling.type, "rope_type": scaling.type, **fields},
            "rope_parameters": {"rope_type": scaling.type, "rope_theta": cfg.rope_theta, **fields}}


def hf_config(cfg: ModelConfig, *, dtype: str = "bfloat16", bos_token_id: int | None = None,
              eos_token_id: int | None = None, pad_token_id: int | None = None) -> dict[str, Any]:
    """The `config.json` of `cfg`: `config_from_hf(hf_config(cfg), **runtime)` gives back `cfg`
    (`runtime`: its `RUNTIME_FIELDS`). `dtype` is the storage dtype of the weights."""
    model_type = hf_model_type(cfg)
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.kv_heads, "hidden_act": cfg.hidden_act,
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "initializer_range": cfg.initializer_range, "tie_word_embeddings": cfg.tie_word_embeddings,
        **_rope(cfg), "use_cache": True, "dtype": dtype, "torch_dtype": dtype,  # transformers 5 / 4 spelling
    }
    if cfg.is_mla:
        out.update(q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
                   qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, attention_bias=False,
                   n_routed_experts=cfg.n_routed_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                   moe_intermediate_size=cfg.moe_intermediate_size, n_shared_experts=cfg.n_shared_experts,
                   # transformers makes every layer from first_k_dense_replace on MoE
                   first_k_dense_replace=cfg.first_k_dense_replace if cfg.is_moe else cfg.num_hidden_layers,
                   n_group=cfg.n_group, topk_group=cfg.topk_group, scoring_func=cfg.scoring_func,
                   topk_method=cfg.topk_method, routed_scaling_factor=cfg.routed_scaling_factor,
                   norm_topk_prob=cfg.norm_topk_prob, aux_loss_alpha=cfg.aux_loss_alpha,
                   bias_update_speed=cfg.bias_update_speed, num_nextn_predict_layers=cfg.num_nextn_predict_layers)
        if model_type == "deepseek_v3":
            out["rope_interleave"] = cfg.rope_interleave
    else:
        if model_type == "llama":
            out.update(attention_bias=cfg.attention_bias, mlp_bias=False)
        else:
            out["use_sliding_window"] = False
        if cfg.num_nextn_predict_layers:
            out["num_nextn_predict_layers"] = cfg.num_nextn_predict_layers
    if cfg.head_dim is not None:  # MLA has none (transformers derives one), but keep the round trip exact
        out["head_dim"] = cfg.head_dim
    ids = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    out.update({k: v for k, v in ids.items() if v is not None})
    return out


# ----------------------------------------------------------------------------- weights


def storage_dtype(name: str, dtype: str) -> np.dtype:
    return np.dtype(np.float32) if name.endswith(FLOAT32_SUFFIXES) else STORAGE_DTYPES[dtype]


@jax.jit
def _layer(stack: jax.Array, index: jax.Array) -> jax.Array:
    return stack[index]  # a traced index: one compile per shape, not per layer


def _read(model: Decoder, path, index: int | None) -> np.ndarray:
    """A parameter, or one layer of a stacked one, as NumPy, without copying the whole stack to host."""
    value = variable(model, path).get_value()
    if index is None:
        return np.asarray(value)
    devices = value.devices()
    if len(devices) == 1 and next(iter(devices)).platform == "cpu":
        return np.asarray(value)[index]  # NumPy views a one-device CPU array in place: no copy, no compile
    return np.asarray(_layer(value, np.int32(index)))


def hf_tensors(model: Decoder, *, dtype: str = "float32", experts: Experts = "fused",
               mtp: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, contiguous array in its storage dtype) of every tensor of `model`'s checkpoint,
    in layout order, each read from the model only when it is reached. A tied head is not
    written (transformers ties it on load)."""
    for place in layout(model.cfg, experts=experts, mtp=mtp):
        for rule in place.rules:
            arrays = [_read(model, place.ours_prefix + p, place.index) for p in rule.ours]
            for name, arr in zip(rule.hf, rule.to_hf(*arrays), strict=True):
                name = place.hf_prefix + name
                yield name, np.ascontiguousarray(arr, dtype=storage_dtype(name, dtype))


def total_bytes(model: Decoder, *, dtype: str, experts: Experts = "fused", mtp: bool = False) -> int:
    """What `hf_tensors` will yield, from shapes alone (every rule moves elements, never adds any)."""
    total = 0
    for place in layout(model.cfg, experts=experts, mtp=mtp):
        for rule in place.rules:
            shapes = [variable(model, place.ours_prefix + p).get_value().shape for p in rule.ours]
            n = sum(math.prod(s[place.index is not None:]) for s in shapes)
            total += n * storage_dtype(place.hf_prefix + rule.hf[0], dtype).itemsize
    return total


def write_safetensors(tensors: Iterable[tuple[str, np.ndarray]], directory: Path, max_shard_bytes: int,
                      progress=None) -> tuple[int, int, list[str]]:
    """Fills shards of at most `max_shard_bytes` of tensor data (a larger tensor gets one of its
    own) in order; one shard is `model.safetensors`, more are `model-0000i-of-0000N.safetensors`
    with `model.safetensors.index.json`. Returns (tensors, bytes, file names)."""
    shards: list[list[str]] = []
    pending: dict[str, np.ndarray] = {}
    pending_bytes = total = 0
    seen: set[str] = set()

    def flush():
        save_file(pending, str(directory / f"shard-{len(shards)}.part"), metadata={"format": "pt"})
        shards.append(list(pending))
        pending.clear()

    for name, arr in tensors:
        if name in seen:
            raise ValueError(f"{name}: written twice")
        seen.add(name)
        if pending and pending_bytes + arr.nbytes > max_shard_bytes:
            flush()
            pending_bytes = 0
        pending[name] = arr
        pending_bytes += arr.nbytes
        total += arr.nbytes
        if progress is not None:
            progress.update(arr.nbytes)
    if pending:
        flush()
    if len(shards) == 1:
        (directory / "shard-0.part").rename(directory / SINGLE)
        return len(shards[0]), total, [SINGLE]
    files, weight_map = [], {}
    for i, names in enumerate(shards):
        files.append(f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
        (directory / f"shard-{i}.part").rename(directory / files[-1])
        weight_map.update(dict.fromkeys(names, files[-1]))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return len(weight_map), total, files


# ----------------------------------------------------------------------------- the directory


def _is_nonempty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def _move_into_place(tmp: Path, out: Path) -> None:
    if not _is_nonempty(out):
        if out.exists():
            out.rmdir()
        tmp.rename(out)
        return
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old) if old.is_dir() else old.unlink()


def export(model: Decoder, out_dir: str | os.PathLike, *, tokenizer=None,
           dtype: str = "bfloat16", max_shard_bytes: int = 5 * 2**30, experts: Experts = "fused",
           mtp: bool = False, overwrite: bool = False, progress: bool = True) -> Path:
    """Writes `model` as an HF directory at `out_dir` (see the module doc) and returns its path.

    tokenizer: a `Tokenizer`, or a path `r1jax.data.tokenizer.load_tokenizer` opens (a directory, a
    tokenizer.json or a .model); its files are copied and its bos / eos / pad ids go into
    config.json. An existing non-empty `out_dir` is replaced only with `overwrite`."""
    from tqdm import tqdm

    from r1jax.data.tokenizer import load_tokenizer, save_tokenizer

    out = Path(out_dir).absolute()
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {list(STORAGE_DTYPES)}, got {dtype!r}")
    if experts not in ("fused", "per_expert"):
        raise ValueError(f"experts must be fused or per_expert, got {experts!r}")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    if getattr(model.cfg, "expert_dtype", "param") != "param":
        raise ValueError(f"expert_dtype={model.cfg.expert_dtype}: export a model with dequantized (param) experts")
    if _is_nonempty(out) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=true to replace it)")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    ids = {} if tokenizer is None else {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                                        "pad_token_id": tokenizer.pad_id}
    config = hf_config(model.cfg, dtype=dtype, **ids)  # raises before anything is written

    start = time.perf_counter()
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed export with this pid
    tmp.mkdir(parents=True)
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        size = total_bytes(model, dtype=dtype, experts=experts, mtp=mtp)
        with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=f"writing {out.name}",
                  dynamic_ncols=True, disable=not progress) as bar:
            n, nbytes, files = write_safetensors(hf_tensors(model, dtype=dtype, experts=experts, mtp=mtp),
                                                 tmp, max_shard_bytes, bar)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    print(f"wrote {out}: {n} tensors, {nbytes / 1e6:.1f} MB {dtype} in {len(files)} file(s), {seconds:.1f} s "
          f"({nbytes / 1e6 / max(seconds, 1e-9):.0f} MB/s)")
    return out


# ----------------------------------------------------------------------------- r1jax checkpoints


def parse_size(text: str) -> int:
    """"5GB" (10^9, as transformers counts), "5GiB" (2^30), "500MB", or plain bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in units:
        raise ValueError(f"cannot read {text!r} (e.g. 5GB, 500MiB, 1000000)")
    return int(float(match.group(1)) * units[match.group(2).upper()])


def main(argv: list[str]) -> int:
    from r1jax.config import parse_options

    if len([a for a in argv if "=" not in a]) != 2 or "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0 if ("-h" in argv or "--help" in argv) else 2
    known = {"dtype": str, "max_shard_size": parse_size, "experts": str, "mtp": bool, "overwrite": bool,
             "tokenizer": str}
    try:
        positional, options, _ = parse_options(argv, known, positional=("RUN_OR_PARAMS_DIR", "HF_OUT_DIR"),
                                               unknown="error")
        kwargs = {"dtype": options.get("dtype", "bfloat16"), "experts": options.get("experts", "fused"),
                  "mtp": options.get("mtp", False), "overwrite": options.get("overwrite", False)}
        if "max_shard_size" in options:
            kwargs["max_shard_bytes"] = options["max_shard_size"]
        if kwargs["dtype"] not in STORAGE_DTYPES or kwargs["experts"] not in ("fused", "per_expert"):
            raise ValueError(f"dtype must be one of {list(STORAGE_DTYPES)} and experts fused or per_expert")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    source, out = positional
    try:
        if _is_nonempty(Path(out)) and not kwargs["overwrite"]:  # before the model is read
            raise FileExistsError(f"{out} exists and is not empty (pass overwrite=true to replace it)")
        from r1jax.interop.hf import load

        model, found = load(source)
        tokenizer = options.get("tokenizer")
        tokenizer = None if tokenizer == "none" else tokenizer or found
        if tokenizer is None:
            print(f"note: no tokenizer found for {source}; writing weights and config only", file=sys.stderr)
        elif str(getattr(tokenizer, "model_file", tokenizer)).endswith(".model"):
            print("note: the tokenizer is a SentencePiece .model: copied as tokenizer.model, which r1jax "
                  "loads and transformers' AutoTokenizer does not", file=sys.stderr)
        export(model, out, tokenizer=tokenizer, **kwargs)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
