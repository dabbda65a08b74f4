"""HF model directory -> r1jax params export (Orbax), with the model config and tokenizer files:

    python -m r1jax.interop.convert HF_DIR OUT_DIR [dtype=bfloat16] [fp8_experts=true] [key=value ...]

dtype: the parameters' dtype (default bfloat16; float32 for exact parity tests). fp8_experts:
keep the routed experts in FP8 with their block scales (`model.expert_dtype=float8_e4m3fn`),
for serving the 671B model from one 8-GPU node. Other `key=value` pairs override model fields.
Every tensor is checked against the config before anything is read; on an error (one line
naming the file or tensor) nothing is written to OUT_DIR. The export is what `init_from=`,
`serve.py checkpoint=` and `r1jax.interop.hf.load` take, as they take HF_DIR itself.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from pathlib import Path

from tqdm import tqdm

from r1jax import checkpoint as ckpt_lib
from r1jax.config import ConfigError, parse_options
from r1jax.interop import hf_dir
from r1jax.interop.safetensors_files import CheckpointError, SafetensorsFiles
from r1jax.model.decoder import abstract_decoder

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json")


def convert(hf_path: str | Path, out_dir: str | Path, *, dtype: str = "bfloat16", fp8_experts: bool = False,
            progress: bool = True, **overrides) -> dict:
    """Converts; returns a summary {"tensors", "bytes", "seconds", "out"}."""
    t0 = time.perf_counter()
    hf_path, out_dir = Path(hf_path), Path(out_dir)
    files = SafetensorsFiles(hf_path)
    fields = {**hf_dir.dtype_fields(dtype), **overrides}
    if fp8_experts:
        fields["expert_dtype"] = "float8_e4m3fn"
    cfg = hf_dir.model_config(hf_path, files, **fields)
    total = sum(files.nbytes(n) for n in files.names)
    _, params, extra = abstract_decoder(cfg)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"reading {hf_path.name}", disable=not progress) as bar:
        # checks every tensor from the headers first: a bad input raises before anything is written
        params, extra = hf_dir.load_weights(hf_path, (params, extra), cfg, progress=bar.update, files=files)
    meta = {"config": {"model": dataclasses.asdict(cfg)}, "source": str(hf_path.resolve())}
    ckpt_lib.export_params(out_dir, (params, extra), meta=meta)
    for name in TOKENIZER_FILES:
        if (hf_path / name).is_file():
            shutil.copy2(hf_path / name, out_dir / name)
    seconds = time.perf_counter() - t0
    return {"tensors": len(files.names), "bytes": total, "seconds": seconds, "out": str(out_dir)}


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import yaml

    hf_path, out_dir = argv[0], argv[1]
    try:
        _, options, fields = parse_options(argv[2:], {"dtype": str, "fp8_experts": bool}, positional=())
        for item in fields:  # model fields
            key, _, value = item.partition("=")
            options[key] = yaml.safe_load(value)
        summary = convert(hf_path, out_dir, **options)
    except (CheckpointError, ConfigError, FileNotFoundError) as e:
        print(f"convert: {e}", file=sys.stderr)
        return 1
    print(f"converted {summary['tensors']} tensors, {summary['bytes'] / 1e9:.2f} GB in {summary['seconds']:.1f} s "
          f"({summary['bytes'] / 1e6 / summary['seconds']:.0f} MB/s) -> {summary['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
