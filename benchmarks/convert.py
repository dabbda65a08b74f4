# Results, 2026-12-03: `python benchmarks/convert.py` (--gb 2, fp8 and bf16), 2 CPUs, 24 GiB RAM, JAX CPU,
# transformers 5.24 without accelerate; page cache warm for every row. After the host-jitted FP8 dequantize, one
# zeros constructor per shape and uncompressed Orbax exports (before: fp8 convert 38.1 s / 1.67x RSS, load 20.3 s;
# bf16 convert 15.5 s / 1.83x RSS):
# | variant | path                                  | wall s | MB/s   | wall / cat | peak RSS growth GB | RSS / param bytes |
# |---------|---------------------------------------|--------|--------|------------|--------------------|-------------------|
# | fp8     | cat (warm page cache)                 | 0.10   | 20,542 | 1.00       | -                  | -                 |
# | fp8     | convert (load + Orbax)                | 27.8   | 72     | 285.3      | 4.06               | 1.10 (of 3.69 GB) |
# | fp8     | hf_dir.load_model                     | 16.2   | 124    | 166.1      | 4.06               | 1.10 (of 3.69 GB) |
# | fp8     | from_pretrained + from_transformers   | fails: transformers needs accelerate for FP8 layouts          |
# | bf16    | cat (warm page cache)                 | 0.12   | 16,070 | 1.00       | -                  | -                 |
# | bf16    | convert (load + Orbax)                | 16.9   | 113    | 141.9      | 2.35               | 1.23 (of 1.91 GB) |
# | bf16    | hf_dir.load_model                     | 6.8    | 283    | 56.8       | 2.37               | 1.24 (of 1.91 GB) |
# | bf16    | from_pretrained + from_transformers   | 27.7   | 69     | 232.7      | 14.28              | 7.46 (of 1.91 GB) |
# Where it goes: Orbax export 12.0 / 6.6 s; the per-expert stacks (dequantize, transpose, cast, np.stack) 7.1 /
# 2.7 s; host->device placement and layer updates ~4-5 s. wall / cat <= 1.5 is out of reach against a warm page
# cache (~20 GB/s): one memcpy of the result alone is ~0.5 s here; a cold-disk read is the realistic bar.

"""HF directory -> r1jax conversion: wall time and peak host memory of `r1jax.interop.convert`
(and of `hf_dir.load_model` alone, and of the transformers round trip it replaces) on a
synthesized checkpoint of ~--gb GB, against `cat` of the same files.

    python benchmarks/convert.py                          # --gb 2, both variants
    python benchmarks/convert.py --gb 0.3 --variants bf16 # quick
    python benchmarks/convert.py --dir /data/tmp --keep   # keep the synthesized directories

Variants (a DeepSeek-V3-shaped config: hidden 1536, MLA with q/kv LoRA 512/256, 12 heads,
one dense layer first, 48 routed experts of 768 + 1 shared (16 when --gb is too small for two
layers of 48), vocab 16384; the number of layers is chosen so that each variant's files total
~--gb GB, so the bf16 variant has about half the layers of the fp8 one):
  fp8   DeepSeek-V3's released layout: per-expert tensors, every projection float8_e4m3fn with a
        float32 `weight_scale_inv` of 128 x 128 blocks, norms / embeddings / router / eh_proj /
        head bf16, the correction bias f32, one MTP layer (with its copies of the embedding and
        head), `quantization_config` in config.json.
  bf16  what transformers 5.x's `save_pretrained` writes for a bf16 DeepseekV3: per-expert
        tensors (transformers un-fuses its experts on save), no MTP, no quantization_config.
Weights are random (FP8 bytes drawn directly, NaN patterns avoided; bf16 from float32 normals),
drawn tensor by tensor and streamed into safetensors shards of --shard-mb MB, so the generator
never holds more than one tensor.

Rows, each measured in a fresh subprocess (JAX on CPU; imports, JAX backend and torch done
before the baseline), so peak RSS is that path's own:
  cat            `cat SHARDS > /dev/null`, after one untimed cat: the page cache is warm for this
                 row and for every other (each row is preceded by an untimed cat as well)
  convert        `r1jax.interop.convert.convert(dir, out, dtype="bfloat16")` (load + Orbax export)
  load_model     `hf_dir.load_model(dir, dtype="bfloat16")`, arrays ready (no Orbax write)
  transformers   `AutoModelForCausalLM.from_pretrained(dir, dtype=torch.bfloat16)` +
                 `r1jax.interop.hf.from_transformers(model, dtype=..., param_dtype="bfloat16")`;
                 skipped (said in the row) when ~7.5x the bf16 parameter bytes would not fit in the
                 memory available; transformers 5.24 needs `accelerate` to open the FP8 layout
                 (on CPU it dequantizes to bf16), so without it the fp8 row says so
MB/s is file bytes / wall. Peak RSS growth = ru_maxrss at the end - RSS before loading;
"RSS / param bytes" divides it by the bytes of the resulting r1jax parameters (bf16, plus the
f32 routing biases). Goals for convert: RSS / param bytes <= 1.1, wall / cat <= 1.5.
Below the table, per row: where the time went (sections timed by wrapping r1jax functions in the
child; the r1jax code is not changed) and the peak RSS within each phase (sampled every 20 ms).
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BLOCK = (128, 128)
SHAPE = {"vocab_size": 16384, "hidden_size": 1536, "intermediate_size": 4096, "moe_intermediate_size": 768,
         "num_attention_heads": 12, "q_lora_rank": 512, "kv_lora_rank": 256, "qk_nope_head_dim": 64,
         "qk_rope_head_dim": 32, "v_head_dim": 64, "n_routed_experts": 48, "num_experts_per_tok": 8,
         "n_shared_experts": 1, "n_group": 8, "topk_group": 4, "first_k_dense_replace": 1}
MODES = ("convert", "load_model", "transformers")
GB = 1e9
OLD_PATH_RSS = 7.5  # the transformers path's peak RSS growth / bf16 parameter bytes (6.6 at --gb 0.3, 7.46 at 2)


# ----------------------------------------------------------------------------- the checkpoint


def hf_config(layers: int, fp8: bool, experts: int = SHAPE["n_routed_experts"]) -> dict:
    s = SHAPE
    cfg = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "dtype": "bfloat16",
        **s, "num_hidden_layers": layers, "n_routed_experts": experts, "num_key_value_heads": s["num_attention_heads"],
        "head_dim": s["qk_rope_head_dim"], "qk_head_dim": s["qk_nope_head_dim"] + s["qk_rope_head_dim"],
        "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0, "rms_norm_eps": 1e-6,
        "routed_scaling_factor": 2.5, "norm_topk_prob": True, "rope_interleave": True, "pretraining_tp": 1,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "max_position_embeddings": 4096,
        "initializer_range": 0.02, "tie_word_embeddings": False, "use_cache": True, "bos_token_id": 0,
        "eos_token_id": 1, "num_nextn_predict_layers": 1 if fp8 else 0,
    }
    if fp8:
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": list(BLOCK)}
    return cfg


def tensor_specs(cfg: dict, fp8: bool) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) of every stored tensor in file order; kind: fp8 | scale | bf16 | norm | f32."""
    d, v, h = cfg["hidden_size"], cfg["vocab_size"], cfg["num_attention_heads"]
    q, lat = cfg["q_lora_rank"], cfg["kv_lora_rank"]
    n, r, vd = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    e, f, fi = cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["intermediate_size"]
    fs = f * cfg["n_shared_experts"]
    out: list[tuple[str, tuple[int, ...], str]] = []

    def proj(name, shape):
        if fp8:
            out.append((name, shape, "fp8"))
            out.append((name + "_scale_inv", (-(-shape[0] // BLOCK[0]), -(-shape[1] // BLOCK[1])), "scale"))
        else:
            out.append((name, shape, "bf16"))

    def mlp(prefix, hidden):
        proj(prefix + "gate_proj.weight", (hidden, d))
        proj(prefix + "up_proj.weight", (hidden, d))
        proj(prefix + "down_proj.weight", (d, hidden))

    def block(p, moe):
        out.append((p + "input_layernorm.weight", (d,), "norm"))
        out.append((p + "post_attention_layernorm.weight", (d,), "norm"))
        a = p + "self_attn."
        proj(a + "q_a_proj.weight", (q, d))
        out.append((a + "q_a_layernorm.weight", (q,), "norm"))
        proj(a + "q_b_proj.weight", (h * (n + r), q))
        proj(a + "kv_a_proj_with_mqa.weight", (lat + r, d))
        out.append((a + "kv_a_layernorm.weight", (lat,), "norm"))
        proj(a + "kv_b_proj.weight", (h * (n + vd), lat))
        proj(a + "o_proj.weight", (d, h * vd))
        if not moe:
            mlp(p + "mlp.", fi)
            return
        out.append((p + "mlp.gate.weight", (e, d), "bf16"))
        out.append((p + "mlp.gate.e_score_correction_bias", (e,), "f32"))
        for j in range(e):
            mlp(f"{p}mlp.experts.{j}.", f)
        mlp(p + "mlp.shared_experts.", fs)

    out.append(("model.embed_tokens.weight", (v, d), "bf16"))
    layers = cfg["num_hidden_layers"]
    for i in range(layers):
        block(f"model.layers.{i}.", i >= cfg["first_k_dense_replace"])
    for k in range(cfg["num_nextn_predict_layers"]):
        p = f"model.layers.{layers + k}."
        out += [(p + "enorm.weight", (d,), "norm"), (p + "hnorm.weight", (d,), "norm"),
                (p + "eh_proj.weight", (d, 2 * d), "bf16"), (p + "embed_tokens.weight", (v, d), "bf16"),
                (p + "shared_head.norm.weight", (d,), "norm"), (p + "shared_head.head.weight", (v, d), "bf16")]
        block(p, True)
    out += [("model.norm.weight", (d,), "norm"), ("lm_head.weight", (v, d), "bf16")]
    return out


ITEMSIZE = {"fp8": 1, "scale": 4, "bf16": 2, "norm": 2, "f32": 4}
ST_DTYPE = {"fp8": "F8_E4M3", "scale": "F32", "bf16": "BF16", "norm": "BF16", "f32": "F32"}


def nbytes(specs) -> int:
    return sum(math.prod(s) * ITEMSIZE[k] for _, s, k in specs)


def plan(gb: float, fp8: bool) -> dict:
    """The config whose files come closest to `gb` GB: 48 experts, fewer only when even two layers
    (one dense, one MoE) of 48 would overshoot (small --gb); then the number of layers."""
    experts = next(e for e in (48, 32, 16) if e == 16 or nbytes(tensor_specs(hf_config(2, fp8, e), fp8)) <= gb * GB)
    best = None
    for layers in range(2, 200):
        size = nbytes(tensor_specs(hf_config(layers, fp8, experts), fp8))
        if best is None or abs(size - gb * GB) < abs(best[1] - gb * GB):
            best = (layers, size)
        if size > gb * GB:
            break
    return hf_config(best[0], fp8, experts)


def draw(rng: np.random.Generator, shape, kind: str) -> np.ndarray:
    """Random stored bytes of one tensor, as uint8 / uint16 / float32 (no ml_dtypes casts: fast)."""
    if kind == "fp8":
        b = rng.integers(0, 256, size=shape, dtype=np.uint8)
        b[(b & 0x7F) == 0x7F] ^= 1  # 0x7F / 0xFF are NaN in e4m3fn
        return b
    if kind == "scale":
        return rng.uniform(2e-5, 2e-4, size=shape).astype(np.float32)  # |W| <= 448 * 2e-4 ~ 0.09
    if kind == "bf16":  # a bf16 is the top half of a float32
        w = rng.standard_normal(size=shape, dtype=np.float32)
        w *= 0.02
        return (w.view(np.uint32) >> 16).astype(np.uint16)
    if kind == "norm":
        return np.full(shape, 0x3F80, np.uint16)  # 1.0
    return (rng.standard_normal(size=shape, dtype=np.float32) * 0.01).astype(np.float32)


def write_checkpoint(directory: Path, cfg: dict, fp8: bool, shard_mb: int, seed: int = 0) -> tuple[list[Path], int]:
    """Streams the tensors of `cfg` into shards of ~shard_mb MB + index + config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    specs = tensor_specs(cfg, fp8)
    shards, cur, size = [], [], 0
    for spec in specs:
        cur.append(spec)
        size += math.prod(spec[1]) * ITEMSIZE[spec[2]]
        if size >= shard_mb * 1e6:
            shards.append(cur)
            cur, size = [], 0
    if cur:
        shards.append(cur)
    rng = np.random.default_rng(seed)
    weight_map, paths = {}, []
    for i, group in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for t, shape, kind in group:
            n = math.prod(shape) * ITEMSIZE[kind]
            header[t] = {"dtype": ST_DTYPE[kind], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[t] = name
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(directory / name, "wb") as fh:
            fh.write(len(raw).to_bytes(8, "little"))
            fh.write(raw)
            for _, shape, kind in group:
                fh.write(np.ascontiguousarray(draw(rng, shape, kind)).data)
        paths.append(directory / name)
    total = nbytes(specs)
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(cfg, indent=1))
    return paths, total


# ----------------------------------------------------------------------------- the measured child


def child(mode: str, directory: str, out: str) -> None:
    """Runs one path in this (fresh) process; prints one line `RESULT {json}`."""
    import resource
    import threading
    from collections import defaultdict

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import psutil
    from flax import nnx

    from r1jax import checkpoint as ckpt_lib
    from r1jax.interop import convert as convert_lib
    from r1jax.interop import hf_dir
    from r1jax.interop.safetensors_files import SafetensorsFiles
    from r1jax.model import fp8 as fp8_lib

    if mode == "transformers":
        import torch
        import transformers

        from r1jax.interop.hf import from_transformers
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    jax.devices()
    jax.block_until_ready(jax.numpy.zeros(8) + 1)
    proc = psutil.Process()
    base = proc.memory_info().rss
    times: dict[str, float] = defaultdict(float)
    peaks: dict[str, int] = {}
    state = {"phase": "setup", "stop": False}

    def sample():
        while not state["stop"]:
            rss = proc.memory_info().rss
            peaks[state["phase"]] = max(peaks.get(state["phase"], 0), rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    calls: list[list] = []  # the timed calls in progress: [key, seconds spent in timed calls inside it]

    def timed(key, fn, phase=None):
        """`fn`, its time (less that of timed calls inside it: sections are exclusive) added to times[key]."""
        def wrapper(*a, **k):
            if phase:
                state["phase"] = phase
            calls.append([key, 0.0])
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent = time.perf_counter() - t
                times[key] += spent - calls.pop()[1]
                if calls:
                    calls[-1][1] += spent
                if phase:
                    rss = proc.memory_info().rss
                    peaks[phase] = max(peaks.get(phase, 0), rss)
                    after[phase] = rss - base
                    state["phase"] = "after " + phase
        return wrapper

    after: dict[str, int] = {}
    abstract_model = hf_dir.abstract_model
    # Whatever of these the installed r1jax has (the loader's internals move); each is timed exclusively.
    sections = [(SafetensorsFiles, "read", "files.read (disk)"), (fp8_lib, "dequantize", "fp8.dequantize"),
                (hf_dir, "check", "header check"), (hf_dir, "abstract_model", "abstract model"),
                (getattr(hf_dir, "ExpertStack", None), "__getitem__", "ExpertStack (transpose, cast, np.stack)"),
                (hf_dir, "_put", "_put (make_array_from_callback)"), (hf_dir, "_set_layer", "_set_layer (dispatch)"),
                (hf_dir._Placer, "__call__", "_Placer own (astype, zeros)")]
    for owner, name, key in sections:
        if owner is not None and hasattr(owner, name):
            setattr(owner, name, timed(key, getattr(owner, name)))
    hf_dir.load_weights = timed("load_weights own (name table, rule.to_ours)", hf_dir.load_weights, "load_weights")
    ckpt_lib.export_params = timed("Orbax export_params", ckpt_lib.export_params, "export_params")

    def param_bytes(tree) -> int:
        return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))

    result: dict = {}
    t0 = time.perf_counter()
    if mode == "convert":
        convert_lib.convert(directory, out, dtype="bfloat16", progress=False)
        wall = time.perf_counter() - t0
        cfg = hf_dir.model_config(directory, dtype="bfloat16", param_dtype="bfloat16")
        result["param_bytes"] = param_bytes(abstract_model(cfg)[1])
        result["out_bytes"] = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    elif mode == "load_model":
        model = hf_dir.load_model(directory, dtype="bfloat16")
        jax.block_until_ready(nnx.state(model))
        wall = time.perf_counter() - t0
        result["param_bytes"] = param_bytes(nnx.state(model))
    else:
        state["phase"] = "from_pretrained"
        hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
        times["from_pretrained"] = time.perf_counter() - t0
        after["from_pretrained"] = proc.memory_info().rss - base
        from r1jax.interop import hf as hf_lib

        hf_lib.to_ours = timed("to_ours (transposes, np.stack, f32)", hf_lib.to_ours, "to_ours")
        hf_lib.build_with = timed("build_with (jnp.asarray to bf16)", hf_lib.build_with, "build_with")
        convert_model = timed("from_transformers own (state_dict -> f32 numpy)", from_transformers,
                              "state_dict to f32")
        model = convert_model(hf, dtype="bfloat16", param_dtype="bfloat16")
        jax.block_until_ready(nnx.state(model))
        wall = time.perf_counter() - t0
        result["param_bytes"] = param_bytes(nnx.state(model))
    state["stop"] = True
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result.update(wall=wall, base=base, peak=peak, growth=peak - base, times=dict(times), after=after,
                  phase_peaks={k: v - base for k, v in peaks.items()})
    print("RESULT " + json.dumps(result), flush=True)


def run_child(mode: str, directory: Path, out: Path, timeout: int) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", "TRANSFORMERS_VERBOSITY": "error"}
    try:
        p = subprocess.run([sys.executable, __file__, "--child", mode, "--dir", str(directory), "--out", str(out)],
                           capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    lines = [x for x in p.stderr.strip().splitlines() if x.strip()]
    errs = [x for x in lines if "Error" in x or "error" in x]
    return {"error": (errs or lines or [f"exit {p.returncode}"])[-1].strip()[:300]}


def cat(paths: list[Path]) -> float:
    t = time.perf_counter()
    subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


# ----------------------------------------------------------------------------- report


def table(rows: list[dict]) -> str:
    cols = ["variant", "path", "wall s", "MB/s", "wall / cat", "peak RSS growth GB", "RSS / param bytes"]
    body = [[r.get(c, "-") for c in cols] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(cols)]
    line = lambda xs: "| " + " | ".join(x.ljust(w) for x, w in zip(xs, widths)) + " |"
    return "\n".join([line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(b) for b in body])


def breakdown(variant: str, mode: str, res: dict) -> str:
    t = res["times"]
    parts = [f"{k} {v:.1f}s" for k, v in sorted(t.items(), key=lambda kv: -kv[1]) if v >= 0.05]
    rest = res["wall"] - sum(t.values())
    if mode != "transformers":
        parts.append(f"untimed {rest:.1f}s")
    rss = [f"{k} {v / GB:.2f}" for k, v in res["phase_peaks"].items()]
    after = [f"after {k} {v / GB:.2f}" for k, v in res["after"].items()]
    extra = f"; Orbax export {res['out_bytes'] / GB:.2f} GB on disk" if "out_bytes" in res else ""
    return (f"- {variant} {mode} ({res['wall']:.1f}s): " + ", ".join(parts) + "\n    RSS growth (GB): peak by phase "
            + ", ".join(rss) + ("; " + ", ".join(after) if after else "") + extra)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=2.0, help="size of each synthesized checkpoint, GB")
    ap.add_argument("--variants", default="fp8,bf16", help="comma-separated: fp8, bf16")
    ap.add_argument("--paths", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES))
    ap.add_argument("--dir", help="where to synthesize (default: a new temporary directory under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the synthesized checkpoints and exports")
    ap.add_argument("--shard-mb", type=int, default=400, help="safetensors shard size, MB")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per measured subprocess")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.dir, args.out)

    import psutil

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    modes = [m.strip() for m in args.paths.split(",") if m.strip()]
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="r1jax-convert-bench-", dir="/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    mem = psutil.virtual_memory()
    machine = (f"{len(os.sched_getaffinity(0))} of {os.cpu_count()} CPUs, {mem.total / 2**30:.0f} GiB RAM "
               f"({mem.available / 2**30:.0f} GiB available at start), load average {os.getloadavg()[0]:.1f}; "
               f"{datetime.date.today().isoformat()}; JAX CPU")
    print(machine, flush=True)
    rows, notes = [], []
    try:
        for variant in variants:
            fp8 = variant == "fp8"
            cfg = plan(args.gb, fp8)
            d = root / variant
            t = time.perf_counter()
            paths, total = write_checkpoint(d, cfg, fp8, args.shard_mb)
            e = cfg["n_routed_experts"]
            desc = (f"{variant}: {cfg['num_hidden_layers']} layers (1 dense) + {cfg['num_nextn_predict_layers']} MTP, "
                    f"{e} experts, {len(paths)} shards, {total / GB:.2f} GB, "
                    f"{len(json.loads((d / 'model.safetensors.index.json').read_text())['weight_map'])} tensors; "
                    f"written in {time.perf_counter() - t:.0f}s")
            print(desc, flush=True)
            notes.append(desc)
            cat(paths)
            cat_s = min(cat(paths), cat(paths))
            rows.append({"variant": variant, "path": "cat (warm page cache)", "wall s": f"{cat_s:.2f}",
                         "MB/s": f"{total / 1e6 / cat_s:,.0f}", "wall / cat": "1.00"})
            for mode in modes:
                cat(paths)  # keep the page cache warm for every row
                out = root / f"{variant}-export"
                need = OLD_PATH_RSS * total * (2 if fp8 else 1)  # bf16 params: 2 bytes per fp8 byte
                avail = psutil.virtual_memory().available
                # without accelerate, transformers refuses the fp8 layout at once: run it to show that
                refuses = fp8 and importlib.util.find_spec("accelerate") is None
                if mode == "transformers" and not refuses and need > avail - 3 * GB:
                    res = {"skipped": f"needs ~{need / GB:.0f} GB ({OLD_PATH_RSS}x the bf16 params), "
                                      f"{avail / GB:.0f} GB available"}
                else:
                    res = run_child(mode, d, out, args.timeout)
                shutil.rmtree(out, ignore_errors=True)
                row = {"variant": variant, "path": {"convert": "convert (load + Orbax)", "load_model":
                                                    "hf_dir.load_model", "transformers":
                                                    "from_pretrained + from_transformers"}[mode]}
                if "error" in res or "skipped" in res:
                    why = f"fails: {res['error']}" if "error" in res else f"skipped: {res['skipped']}"
                    row["path"] += f" — {why}"
                    print(f"{variant} {mode}: {why}", flush=True)
                else:
                    row.update({"wall s": f"{res['wall']:.1f}", "MB/s": f"{total / 1e6 / res['wall']:,.0f}",
                                "wall / cat": f"{res['wall'] / cat_s:.1f}",
                                "peak RSS growth GB": f"{res['growth'] / GB:.2f}",
                                "RSS / param bytes": f"{res['growth'] / res['param_bytes']:.2f} "
                                                     f"(of {res['param_bytes'] / GB:.2f} GB)"})
                    note = breakdown(variant, mode, res)
                    notes.append(note)
                    print(note, flush=True)
                rows.append(row)
            if not args.keep:
                shutil.rmtree(d, ignore_errors=True)
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    print()
    print(machine)
    print("page cache warm for all rows (one untimed cat before the cat row and before every other row)")
    print()
    print(table(rows))
    print()
    print("\n".join(notes))


if __name__ == "__main__":
    main()
