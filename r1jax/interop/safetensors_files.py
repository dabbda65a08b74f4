"""The safetensors files of an HF model directory, read one tensor at a time.

    files = SafetensorsFiles("DeepSeek-R1/")        # model.safetensors.index.json or model*.safetensors
    files.shape("model.norm.weight"), files.dtype("model.norm.weight")   # from the headers alone
    w = files.read("model.layers.0.self_attn.q_a_proj.weight")            # np.ndarray, stored dtype

A safetensors file is 8 bytes of header length, a JSON header {name: {dtype, shape,
data_offsets}}, then the raw little-endian tensors. Headers are parsed up front, so names,
shapes and dtypes are checked before any tensor is read, and a shard that is missing or shorter
than its header says fails at once, naming the file. Tensors are read with one `readinto` into a
fresh array: nothing is memory-mapped, so resident memory holds only what the caller keeps.
(`safetensors.safe_open(..., "numpy")` cannot return float8 arrays, which NumPy lacks; the
ml_dtypes types that JAX uses can.)
"""

from __future__ import annotations

import glob
import json
import math
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def is_hf_dir(path: str | os.PathLike) -> bool:
    """A Hugging Face model directory: config.json beside safetensors files."""
    path = Path(path)
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


class CheckpointError(ValueError):
    """A checkpoint file or tensor that cannot be used; the message names it."""


def _header(path: Path) -> tuple[int, dict]:
    """(offset of the data, {name: entry}) of one file; checks the file holds what it declares."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated shard ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated shard ({size} bytes, header of {n} declared)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not a safetensors file ({e})") from None
    header.pop("__metadata__", None)
    end = max((e["data_offsets"][1] for e in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated shard ({size} bytes, its header needs {8 + n + end})")
    for name, e in header.items():
        if e["dtype"] not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has dtype {e['dtype']}, which r1jax does not read")
    return 8 + n, header


class SafetensorsFiles:
    """Every tensor of `directory`'s safetensors files: `model.safetensors.index.json`'s weight
    map if present, else `model.safetensors`, else all `*.safetensors` files."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.directory / f).is_file()]
            if missing:
                count = sum(v == missing[0] for v in weight_map.values())
                raise CheckpointError(f"{self.directory / missing[0]}: missing shard ({INDEX} names it for "
                                      f"{count} tensors)")
        elif (self.directory / SINGLE).is_file():
            files, weight_map = [SINGLE], None
        else:
            files = sorted(os.path.basename(p) for p in glob.glob(str(self.directory / "*.safetensors")))
            weight_map = None
            if not files:
                raise CheckpointError(f"{self.directory}: no {INDEX}, {SINGLE} or *.safetensors files")
        self._entries: dict[str, tuple[Path, int, dict]] = {}
        for name in files:
            path = self.directory / name
            start, header = _header(path)
            for tensor, entry in header.items():
                if weight_map is not None and weight_map.get(tensor) != name:
                    continue  # a stray copy: the index says where each tensor lives
                self._entries[tensor] = (path, start, entry)
        if weight_map is not None:
            absent = [t for t, f in weight_map.items() if t not in self._entries]
            if absent:
                raise CheckpointError(f"{self.directory / weight_map[absent[0]]}: has no tensor {absent[0]} "
                                      f"({INDEX} says it does)")

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)[2]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(DTYPES[self._entry(name)[2]["dtype"]])

    def nbytes(self, name: str) -> int:
        begin, end = self._entry(name)[2]["data_offsets"]
        return end - begin

    def file(self, name: str) -> Path:
        return self._entry(name)[0]

    def read(self, name: str) -> np.ndarray:
        """The tensor `name` as stored (dtype and shape of the header)."""
        path, start, entry = self._entry(name)
        begin, end = entry["data_offsets"]
        shape, dtype = tuple(entry["shape"]), np.dtype(DTYPES[entry["dtype"]])
        if (end - begin) != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {name} holds {end - begin} bytes, {entry['dtype']}{list(shape)} "
                                  f"needs {math.prod(shape) * dtype.itemsize}")
        out = np.empty(shape, dtype)
        with open(path, "rb") as f:
            f.seek(start + begin)
            if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != end - begin:
                raise CheckpointError(f"{path}: truncated while reading {name}")
        return out  # safetensors is little-endian, as are the hosts JAX runs on

    def _entry(self, name: str):
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointError(f"missing tensor {name} (not in {self.directory})") from None
