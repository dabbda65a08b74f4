"""Hugging Face model directories (`config.json` + safetensors + tokenizer files) straight into
r1jax: DeepSeek-V3 / R1 (FP8 or bf16, released per-expert layout with the MTP layer),
DeepSeek-V2 / V2-Lite, and the dense Qwen2 / Llama R1-Distill students.

    model, tokenizer = load("DeepSeek-R1-Distill-Qwen-1.5B", dtype="bfloat16")   # r1jax.interop.hf.load
    cfg = model_config("DeepSeek-R1/")                                            # ModelConfig only
    params, extra = load_weights("DeepSeek-R1/", (abstract_params, abstract_extra))  # sharded targets

The name table is `r1jax.interop.hf.layout`; this module only feeds it from disk. Before any
tensor is read, every tensor of the files is matched against the table from the headers alone:
a name with no place, a missing name, a shape the config does not give, or an FP8 weight
without its `weight_scale_inv` stops the load with a message naming it. Then tensors are read
one at a time (`SafetensorsFiles`), FP8 dequantized block-wise to the target dtype, and written
straight into the target sharding: a stacked layer parameter is one preallocated sharded array,
updated in place (donated) one layer at a time, so host memory holds the parameters placed so
far plus one layer's tensors.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from r1jax.config import ConfigError, ModelConfig, model_config_from_hf
from r1jax.interop import hf as table
from r1jax.interop.safetensors_files import CheckpointError, SafetensorsFiles
from r1jax.model import fp8
from r1jax.model.decoder import Decoder

log = logging.getLogger(__name__)

CONFIG = "config.json"
SCALE_SUFFIX = "_scale_inv"  # `X.weight` -> `X.weight_scale_inv`
FP8_DTYPES = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))


def read_hf_config(path: str | os.PathLike) -> dict:
    try:
        return json.loads((Path(path) / CONFIG).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{Path(path) / CONFIG}: missing (not an HF model directory)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{Path(path) / CONFIG}: not JSON ({e})") from None


def block_size(hf_config: dict) -> tuple[int, int]:
    """The FP8 block [out, in] of `quantization_config` (DeepSeek's default 128 x 128)."""
    q = hf_config.get("quantization_config") or {}
    return tuple(q.get("weight_block_size") or fp8.BLOCK)


def model_config(path: str | os.PathLike, files: SafetensorsFiles | None = None, **overrides) -> ModelConfig:
    """The `ModelConfig` of an HF directory (float32 unless overridden). A config that promises MTP
    layers (`num_nextn_predict_layers`) the files do not hold (transformers saves none) loads
    without them."""
    hf = read_hf_config(path)
    files = files if files is not None else SafetensorsFiles(path)
    depth = hf.get("num_nextn_predict_layers") or 0
    layers = hf.get("num_hidden_layers", 0)
    if depth and "num_nextn_predict_layers" not in overrides:
        present = sum(f"model.layers.{layers + k}.eh_proj.weight" in files for k in range(depth))
        if present < depth:
            log.info("%s: config has %d MTP layers, the files %d: loading %d", path, depth, present, present)
            overrides["num_nextn_predict_layers"] = present
    if hf.get("quantization_config"):
        overrides.setdefault("fp8_block_size", block_size(hf))
    try:
        return model_config_from_hf(hf, **overrides)
    except ConfigError as e:
        raise CheckpointError(f"{Path(path) / CONFIG}: {e}") from None


# ----------------------------------------------------------------------------- the plan, from headers


def _abstract_shapes(cfg: ModelConfig) -> dict[table.Path, jax.ShapeDtypeStruct]:
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    return {tuple(p): jax.ShapeDtypeStruct(v.shape, v.dtype) for p, v in nnx.to_flat_state(nnx.state(model))}


def expected_shapes(cfg: ModelConfig, *, experts: table.Experts, mtp: bool) -> dict[str, tuple[int, ...]]:
    """{HF tensor name: shape} of a checkpoint of `cfg`, from the name table run on abstract
    shapes (`jax.eval_shape`): nothing allocated, so the 671B layout checks in seconds."""
    ours = _abstract_shapes(cfg)
    out: dict[str, tuple[int, ...]] = {}
    memo: dict[tuple, list] = {}
    for place in table.layout(cfg, experts=experts, mtp=mtp):
        for rule in place.rules:
            args = tuple(ours[place.ours_prefix + p].shape[place.index is not None:] for p in rule.ours)
            key = (id(rule), args)
            if key not in memo:
                structs = [jax.ShapeDtypeStruct(s, jnp.float32) for s in args]
                memo[key] = [tuple(o.shape) for o in jax.eval_shape(rule.to_hf, *structs)]
            out.update((place.hf_prefix + n, s) for n, s in zip(rule.hf, memo[key], strict=True))
    return out


def ignored_names(cfg: ModelConfig) -> set[str]:
    """Released tensors that duplicate others: each MTP layer's copies of the embedding and the
    head (equal to the main ones), and a tied model's lm_head."""
    out = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    for k in range(cfg.num_nextn_predict_layers):
        prefix = f"model.layers.{cfg.num_hidden_layers + k}."
        out |= {prefix + "embed_tokens.weight", prefix + "shared_head.head.weight"}
    return out


def check(files: SafetensorsFiles, cfg: ModelConfig, *, block: tuple[int, int] = fp8.BLOCK) -> table.Experts:
    """Raises `CheckpointError` naming the first tensor that is missing, unexpected, of another
    shape than the config gives, not floating point, or FP8 without its scale. Returns the
    experts layout ("per_expert" as released, "fused" as transformers saves)."""
    experts = table.detect_experts(files.names)
    want = expected_shapes(cfg, experts=experts, mtp=cfg.num_nextn_predict_layers > 0)
    for name, shape in want.items():
        if name not in files:
            raise CheckpointError(f"missing tensor {name} (a {type_name(cfg)} of this config needs it)")
        where = f"{name} ({files.file(name).name})"
        if files.shape(name) != shape:
            raise CheckpointError(f"shape of {where} is {list(files.shape(name))}, config says {list(shape)}")
        dtype = files.dtype(name)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise CheckpointError(f"{where} is {dtype}, not a floating-point weight")
        if dtype in FP8_DTYPES:
            scale = name + SCALE_SUFFIX
            if scale not in files:
                raise CheckpointError(f"{where} is {dtype} but its scale {scale} is missing")
            if files.shape(scale) != fp8.scale_shape(shape, block):
                raise CheckpointError(f"shape of {scale} is {list(files.shape(scale))}, blocks of {list(block)} "
                                      f"over {list(shape)} give {list(fp8.scale_shape(shape, block))}")
    used = set(want) | {n + SCALE_SUFFIX for n in want if files.dtype(n) in FP8_DTYPES} | ignored_names(cfg)
    left = [n for n in files.names if n not in used]
    if left:
        raise CheckpointError(f"unexpected tensor {left[0]} ({files.file(left[0]).name}; {len(left)} in all have "
                              f"no place in a {type_name(cfg)} of this config)")
    return experts


def type_name(cfg: ModelConfig) -> str:
    return ("DeepSeek MLA" if cfg.is_mla else "GQA") + (" MoE" if cfg.is_moe else " dense") + " model"


# ----------------------------------------------------------------------------- placing into shardings


def _sharding_of(leaf) -> jax.sharding.Sharding:
    return getattr(leaf, "sharding", None) or SingleDeviceSharding(jax.local_devices()[0])


def _layer_sharding(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The sharding of one layer of a stacked parameter (its leading layers axis dropped)."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    return sharding


def _put(arr: np.ndarray, sharding) -> jax.Array:
    """A host array as a global array with `sharding`; each process supplies only its devices' slices."""
    return jax.make_array_from_callback(arr.shape, sharding, lambda index: arr[index])


@functools.partial(jax.jit, static_argnums=(2, 3))
def _dequantize(q, scale_inv, block, dtype):
    return fp8.dequantize(q, scale_inv, block, dtype)


def _dequantize_on_host(q: np.ndarray, scale_inv: np.ndarray, block, dtype) -> np.ndarray:
    """`fp8.dequantize` compiled for the host CPU: the same bits, much faster than NumPy's
    float8 -> f32 -> bf16 casts, which ml_dtypes converts element by element (benchmarks/convert.py)."""
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        return np.asarray(_dequantize(q, scale_inv, tuple(block), dtype))


@functools.lru_cache(maxsize=None)
def _zeros(shape: tuple[int, ...], dtype, sharding) -> Callable[[], jax.Array]:
    """A compiled constructor of a zero array placed by `sharding` (one per shape, not per parameter)."""
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


_set_layer = jax.jit(lambda stack, layer, i: jax.lax.dynamic_update_index_in_dim(stack, layer, i, 0),
                     donate_argnums=0)


class ExpertStack:
    """One layer's routed experts [E, in, out] from E per-expert tensors [out, in] (the released
    layout), read lazily: indexing reads only the experts the index selects, once each. Placed
    with `jax.make_array_from_callback`, a process reads only the experts its devices hold."""

    def __init__(self, read: Callable[[int], np.ndarray], shape: tuple[int, ...], dtype):
        self.read, self.shape, self.dtype = read, tuple(shape), np.dtype(dtype)
        self._cache: dict[int, np.ndarray] = {}

    def astype(self, dtype, copy: bool = False) -> "ExpertStack":
        return self if np.dtype(dtype) == self.dtype else ExpertStack(self.read, self.shape, dtype)

    def expert(self, j: int) -> np.ndarray:
        if j not in self._cache:
            self._cache[j] = self.read(j).T.astype(self.dtype)
        return self._cache[j]

    def __getitem__(self, index) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        experts = range(self.shape[0])[index[0]] if index else range(self.shape[0])
        return np.stack([self.expert(j)[index[1:]] for j in experts])


class _Placer:
    """Receives (r1jax path, layer index or None, host array) in any order and builds the target's
    arrays: whole arrays placed at once, stacked ones one layer at a time into a donated buffer."""

    def __init__(self, targets: dict[table.Path, Any]):
        self.targets = targets
        self.done: dict[table.Path, jax.Array] = {}

    def __call__(self, path: table.Path, index: int | None, arr) -> None:
        """`arr`: a host array, or an `ExpertStack` read only where a local device needs it."""
        t = self.targets[path]
        arr = arr.astype(t.dtype, copy=False)
        sharding = _sharding_of(t)
        if index is None:
            self.done[path] = _put(arr, sharding)
            return
        if path not in self.done:
            self.done[path] = _zeros(tuple(t.shape), np.dtype(t.dtype), sharding)()
        layer = _put(arr, _layer_sharding(sharding))
        self.done[path] = _set_layer(self.done[path], layer, jnp.int32(index))


def load_weights(path: str | os.PathLike, target, cfg: ModelConfig | None = None, *,
                 progress: Callable[[int], None] | None = None, files: SafetensorsFiles | None = None):
    """Fills `target` (an nnx.State, or a tuple / dict of them, e.g. `(params, extra)` of a split
    abstract Decoder; values `jax.ShapeDtypeStruct`s with optional `sharding=`) from the HF
    directory `path`.
    Leaves whose dtype is float8 get the checkpoint's FP8 bytes and scales as they are (the
    `expert_dtype: float8_e4m3fn` experts); all others the (dequantized) values cast to their dtype.
    `progress(nbytes)` is called after each tensor read; `files`: the directory's, if already open."""
    files = files or SafetensorsFiles(path)
    hf_config = read_hf_config(path)
    block = block_size(hf_config)
    cfg = cfg or model_config(path, files)
    experts = check(files, cfg, block=block)
    states, treedef = jax.tree_util.tree_flatten(target, is_leaf=lambda x: isinstance(x, nnx.State))
    flats = [nnx.to_flat_state(s) for s in states]
    targets = {tuple(p): v.get_value() for flat in flats for p, v in flat}
    paths = list(targets)
    place = _Placer(targets)
    covered: set[table.Path] = set()

    def read(name: str, dtype) -> np.ndarray:
        w = files.read(name)
        if progress:
            progress(files.nbytes(name))
        if w.dtype in FP8_DTYPES and np.dtype(dtype) not in FP8_DTYPES:
            return _dequantize_on_host(w, files.read(name + SCALE_SUFFIX), block, np.dtype(dtype))
        return w

    for p in table.layout(cfg, experts=experts, mtp=cfg.num_nextn_predict_layers > 0):
        for rule in p.rules:
            full = [p.ours_prefix + o for o in rule.ours]
            missing = [o for o in full if o not in targets]
            if missing:
                raise CheckpointError(f"r1jax target has no parameter {'.'.join(map(str, missing[0]))} "
                                      f"for {p.hf_prefix + rule.hf[0]}")
            dtype = targets[full[0]].dtype
            names = [p.hf_prefix + n for n in rule.hf]
            if rule.kind == "per_expert":
                shape = targets[full[0]].shape[p.index is not None:]
                outs = [(full[0], ExpertStack(lambda j: read(names[j], dtype), shape, dtype))]
            else:
                outs = list(zip(full, rule.to_ours(*(read(n, dtype) for n in names)), strict=True))
            if np.dtype(dtype) in FP8_DTYPES:
                outs.append((_scale_path(full[0]), _fp8_scale(files, p, rule, full, targets)))
            for o, arr in outs:
                place(o, p.index, arr)
                covered.add(o)
    left = [o for o in paths if o not in covered]
    if left:
        raise CheckpointError(f"{path}: nothing in the checkpoint fills r1jax's {'.'.join(map(str, left[0]))}")
    filled = [nnx.from_flat_state([(p, v.replace(place.done[tuple(p)])) for p, v in flat]) for flat in flats]
    return jax.tree_util.tree_unflatten(treedef, filled)


def _scale_path(path: table.Path) -> table.Path:
    return path[:-1] + (path[-1] + SCALE_SUFFIX,)


def _fp8_scale(files, place, rule, full, targets) -> np.ndarray:
    """The scale of an FP8 target, moved as its weight is (the per-expert transpose and stack
    apply alike to a weight and its block grid)."""
    if rule.kind != "per_expert" or _scale_path(full[0]) not in targets:
        raise CheckpointError(f"{place.hf_prefix + rule.hf[0]}: r1jax keeps {'.'.join(map(str, full[0]))} in "
                              "float8 only for per-expert weights with a scale beside them")
    names = [place.hf_prefix + n for n in rule.hf]
    if all(files.dtype(n) in FP8_DTYPES for n in names):
        shape = targets[_scale_path(full[0])].shape[place.index is not None:]
        return ExpertStack(lambda j: files.read(names[j] + SCALE_SUFFIX), shape, np.float32)
    raise CheckpointError(f"{names[0]} is {files.dtype(names[0])}: quantize it to FP8 first, or load the experts "
                          "unquantized (model.expert_dtype=param)")


# ----------------------------------------------------------------------------- a model


def abstract_model(cfg: ModelConfig, mesh=None, rules=None):
    """(graphdef, abstract state with shardings when `mesh` is given) of a Decoder of `cfg`."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    if mesh is None:
        return graphdef, state
    from r1jax.parallel.rules import rules_for
    from r1jax.parallel.sharding import shardings

    sh = shardings(state, mesh, rules or rules_for())
    return graphdef, jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, sh)


def dtype_fields(dtype: str | None) -> dict:
    """Model fields for one `dtype` of compute and parameters (float16 keeps float32 parameters)."""
    if dtype is None:
        return {}
    return {"dtype": dtype, "param_dtype": "float32" if dtype == "float16" else dtype}


def load_model(path: str | os.PathLike, *, mesh=None, dtype: str | None = None, rules=None,
               **overrides) -> Decoder:
    """The r1jax `Decoder` of an HF directory, its weights streamed into `mesh`'s shardings (or
    onto one device). `dtype`: compute and parameter dtype (default float32)."""
    t0 = time.perf_counter()
    cfg = model_config(path, **dtype_fields(dtype), **overrides)
    graphdef, target = abstract_model(cfg, mesh, rules)
    state = load_weights(path, target, cfg)
    log.info("loaded %s in %.1f s", path, time.perf_counter() - t0)
    return nnx.merge(graphdef, state)
