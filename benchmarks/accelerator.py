"""Train-step MFU and sampling throughput on one accelerator host (GPU or TPU), under 8 minutes.

    python benchmarks/accelerator.py                          # both models, results in accelerator.json
    python benchmarks/accelerator.py --models small-moe --out moe.json
    python benchmarks/accelerator.py --smoke                  # tiny stand-ins on CPU, < 1 minute: the format only

Models: `small-moe` (configs/model/small-moe.yaml: MLA + 32-expert MoE + MTP, 402M parameters)
and `r1-distill-qwen-1.5b` (configs/model/r1-distill-qwen-1.5b.yaml: Qwen2 1.5B shapes, dense
GQA 12/2 heads, 28 layers, vocab 151936, an LM head of its own as the released model has: 1.78B
parameters), both computing in bfloat16 with the backend's kernels
(`model.attention_impl=auto`, `parallel.expert_kernel=auto`; the `kernels` column says what they
resolved to). Random weights: throughput does not depend on them.

  train     `TrainStep` (the trainer's step: forward, loss, backward, clipping, AdamW, routing
            biases) on a mesh of all local devices (data parallel; fsdp with more than one), f32
            master weights and moments, a synthetic batch of B x T per device. The first call
            (compile) and one more step are left out; step time is the median of --steps.
            MFU = train_flops_per_token(T) x tokens/s / (peak x devices).
  peak      the chip's dense bf16 FLOP/s from its spec sheet (`chips.chip_for_device`); a chip
            not in that table (CPU included) gets a measured jitted GEMM instead: f32 2048^2 on
            CPU, as benchmarks/train_step.py measures it, bf16 8192^2 elsewhere.
  prefill   one `engine.prefill` call over B prompts of --prefill-len tokens, best of 3 after a
            compiling call (benchmarks/decode.py's `prefill_rate`), bf16 weights and cache.
  decode    `Engine.step` with B greedy requests after a --prompt-len prompt, --decode-steps
            tokens a row, --decode-chunk per compiled call, host loop included
            (benchmarks/decode.py's `decode_rate`), one device.

Each measurement that fails (out of memory, a kernel that does not lower) becomes a row with its
error and the run goes on; a train step out of memory is retried once with `model.remat=full`.
The JSON file is rewritten after every row, so a run cut short still leaves what it measured.
Measurements start only while --budget-s allows; later ones are recorded as skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")  # GPU: room for the 1.5B step's state

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from decode import decode_rate, prefill_rate  # noqa: E402  (benchmarks/decode.py)
from r1jax import config as config_lib  # noqa: E402
from r1jax.model.attention_kernels import kernel_table  # noqa: E402
from r1jax.model.decoder import Decoder  # noqa: E402
from r1jax.model.summary import count_params, train_flops_per_token  # noqa: E402
from r1jax.parallel.backend import on_cpu  # noqa: E402
from r1jax.parallel.chips import chip_for_device  # noqa: E402
from r1jax.parallel.mesh import make_mesh  # noqa: E402
from r1jax.sampling.layout import Weights  # noqa: E402
from r1jax.train.metrics import measure_peak_flops  # noqa: E402
from r1jax.train.state import init_key  # noqa: E402
from r1jax.train.step import TrainStep, synthetic_batch  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "model"
KERNELS = ("model.dtype=bfloat16", "model.attention_impl=auto", "parallel.expert_kernel=auto")
# name -> (model config, model overrides, per-device train batch, seq_len); --smoke: tiny stand-ins.
MODELS = {"small-moe": ("small-moe", (), 16, 1024), "r1-distill-qwen-1.5b": ("r1-distill-qwen-1.5b", (), 8, 1024)}
SMOKE_MODELS = {"small-moe": ("tiny-moe", ("model.num_hidden_layers=2",), 2, 32),
                "r1-distill-qwen-1.5b": ("tiny-dense", (), 2, 32)}


def peak_flops() -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    kind = jax.devices()[0].device_kind
    chip = chip_for_device(kind)
    if chip is not None:
        return chip.peak_flops, f"spec sheet ({chip.name}: {chip.source})"
    if on_cpu():
        return measure_peak_flops(), "measured (f32 2048^2 GEMM)"
    return measure_peak_flops(8192, dtype=jnp.bfloat16), f"measured (bf16 8192^2 GEMM; {kind!r} not in chips.py)"


def kernels(cfg: config_lib.Config) -> str:
    """What the run's kernel settings resolve to on this backend."""
    table = kernel_table(cfg.model.attention_impl, cfg.parallel.expert_kernel if cfg.model.is_moe else None)
    return ", ".join(f"{k}={v}" for k, v in table.items())


def brief(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def out_of_memory(e: Exception) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


# ----------------------------------------------------------------------------- train


def train_config(model: str, batch: int, seq: int, devices: int, extra: tuple[str, ...]) -> config_lib.Config:
    return config_lib.load(
        str(CONFIGS / f"{model}.yaml"), *KERNELS, f"batch_size={batch * devices}", f"seq_len={seq}",
        "mesh.data=-1", "mesh.expert=1", "mesh.model=1", f"mesh.fsdp={str(devices > 1).lower()}", *extra)


def time_train(cfg: config_lib.Config, steps: int) -> dict:
    """Median step time of `TrainStep` on all local devices after compile + one warm-up step."""
    step = TrainStep(cfg, make_mesh(cfg.mesh))
    state = step.init(0)
    batch = step.place_batch(synthetic_batch(cfg, jax.random.key(1)))
    t0 = time.perf_counter()
    state, metrics = jax.block_until_ready(step(state, batch))
    first = time.perf_counter() - t0
    state, metrics = jax.block_until_ready(step(state, batch))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = jax.block_until_ready(step(state, batch))
        times.append(time.perf_counter() - t0)
    return {"first_s": first, "step_s": statistics.median(times), "loss": float(metrics["loss"])}


def train_row(name: str, model: str, overrides: tuple[str, ...], batch: int, seq: int, args, peak: float) -> dict:
    """One train measurement; out of memory without remat, once more with `model.remat=full`."""
    devices = jax.device_count()
    row = {"model": name, "config": model, "batch": batch * devices, "seq": seq}
    for remat in ((), ("model.remat=full",)):
        cfg = train_config(model, batch, seq, devices, (*overrides, *remat, *args.set))
        row.update(kernels=kernels(cfg), remat=cfg.model.remat)
        try:
            res = time_train(cfg, args.steps)
        except Exception as e:  # noqa: BLE001  (a row with the error; the run goes on)
            row["error"], oom = brief(e), out_of_memory(e)
        else:
            row.pop("error", None)
            tokens_s = batch * devices * seq / res["step_s"]
            flops_tok = train_flops_per_token(cfg.model, seq)
            return {**row, **res, "params": count_params(cfg.model).total, "flops_per_token": flops_tok,
                    "tokens_s": tokens_s, "mfu": flops_tok * tokens_s / (peak * devices)}
        gc.collect()  # the failed attempt's arrays, freed with its traceback
        if not oom:
            break
    return row


# ----------------------------------------------------------------------------- sampling


def random_weights(model_cfg) -> Weights:
    """The model's own init in bf16 parameters, created on device by one jitted call."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Decoder(model_cfg, rngs=nnx.Rngs(0))))
    params, extra = jax.jit(lambda key: nnx.split(Decoder(model_cfg, rngs=nnx.Rngs(params=key)), nnx.Param, ...)[1:])(
        init_key(0))
    return Weights(graphdef, params, extra)


def sampling_rows(name: str, model: str, overrides: tuple[str, ...], args, over_budget) -> list[dict]:
    cfg = config_lib.load_model(str(CONFIGS / f"{model}.yaml"), *KERNELS[:2], *overrides, "param_dtype=bfloat16")
    try:
        w = random_weights(cfg)
    except Exception as e:  # noqa: BLE001
        return [{"model": name, "config": model, "batch": b, "error": brief(e)} for b in args.batches]
    if on_cpu():
        w = w.unstacked()  # what `Engine` runs on one CPU device, for prefill too
    prompts = [list(np.random.default_rng(i).integers(3, cfg.vocab_size, args.prompt_len)) for i in range(max(args.batches))]
    rows = []
    for b in args.batches:
        row = {"model": name, "config": model, "batch": b}
        skipped = over_budget()
        if skipped:
            rows.append({**row, "skipped": skipped})
            continue
        try:
            row["prefill_tokens_s"] = prefill_rate(w, cfg, b, args.prefill_len, args.max_len)[0]
            row["decode_tokens_s"] = decode_rate(w, prompts, b, args.decode_steps, args.max_len, args.decode_chunk)
        except Exception as e:  # noqa: BLE001
            row["error"] = brief(e)
        rows.append(row)
        gc.collect()
    return rows


# ----------------------------------------------------------------------------- report


def params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def tables(result: dict) -> str:
    lines = [(f"{result['devices']} x {result['device_kind']} ({result['platform']}), peak "
              f"{result['peak_flops'] / 1e12:.3g} TFLOP/s a device: {result['peak_source']}"), "",
             f"{'train':<22}{'params':>9}{'B x T':>12}{'1st s':>8}{'step ms':>10}{'tok/s':>11}{'MFU %':>7}  kernels"]
    for r in result["train"]:
        if "error" in r or "skipped" in r:
            lines.append(f"{r['model']:<22}{'':>9}{r['batch']:>5} x {r['seq']:<5}  {r.get('error') or r['skipped']}")
            continue
        lines.append(f"{r['model']:<22}{params(r['params']):>9}{r['batch']:>5} x {r['seq']:<5}{r['first_s']:>8.1f}"
                     f"{r['step_s'] * 1e3:>10.1f}{r['tokens_s']:>11,.0f}{100 * r['mfu']:>7.1f}  {r['kernels']}"
                     + (" (remat full)" if r["remat"] == "full" else ""))
    lines += ["", f"{'sampling':<22}{'batch':>6}{'prefill tok/s':>15}{'decode tok/s':>14}"]
    for r in result["sampling"]:
        tail = r.get("error") or r.get("skipped")
        lines.append(f"{r['model']:<22}{r['batch']:>6}{fmt(r.get('prefill_tokens_s'), ',.0f'):>15}"
                     f"{fmt(r.get('decode_tokens_s'), ',.0f'):>14}" + (f"  {tail}" if tail else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--smoke", action="store_true", help="tiny stand-in models, batches 1/2, few steps (CPU)")
    p.add_argument("--out", default="accelerator.json", help="JSON results (default: ./accelerator.json)")
    p.add_argument("--steps", type=int, help="timed train steps (default 10; smoke 2)")
    p.add_argument("--batches", type=int, nargs="+", help="sampling batch sizes (default 1 16 64; smoke 1 2)")
    p.add_argument("--prefill-len", type=int, help="prefill prompt tokens (default 512; smoke 16)")
    p.add_argument("--prompt-len", type=int, help="prompt tokens before decode (default 64; smoke 8)")
    p.add_argument("--decode-steps", type=int, help="decoded tokens a row (default 64; smoke 8)")
    p.add_argument("--decode-chunk", type=int, help="decode tokens per compiled call (default 16; smoke 4)")
    p.add_argument("--max-len", type=int, help="cache row length (default 1024; smoke 64)")
    p.add_argument("--budget-s", type=float, default=420, help="start no measurement after this many seconds")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="train config overrides")
    args = p.parse_args(argv)
    small = dict(steps=2, batches=[1, 2], prefill_len=16, prompt_len=8, decode_steps=8, decode_chunk=4, max_len=64)
    full = dict(steps=10, batches=[1, 16, 64], prefill_len=512, prompt_len=64, decode_steps=64, decode_chunk=16,
                max_len=1024)
    for k, v in (small if args.smoke else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    out = Path(args.out)
    if args.smoke:  # tiny programs: compile time is the run time (read when the backend starts, below)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                                   " --xla_llvm_disable_expensive_passes=true")

    start = time.perf_counter()
    peak, source = peak_flops()
    dev = jax.devices()[0]
    result = {"device_kind": dev.device_kind, "platform": dev.platform, "devices": jax.device_count(),
              "peak_flops": peak, "peak_source": source, "smoke": args.smoke, "jax": jax.__version__,
              "settings": {k: getattr(args, k) for k in ("steps", "batches", "prefill_len", "prompt_len",
                                                         "decode_steps", "decode_chunk", "max_len")},
              "train": [], "sampling": []}
    models = SMOKE_MODELS if args.smoke else MODELS

    def save():
        out.write_text(json.dumps(result, indent=1))

    def over_budget() -> str:
        """Why the next measurement is skipped, or "" while --budget-s allows it."""
        elapsed = time.perf_counter() - start
        return f"skipped: {elapsed:.0f} s past --budget-s" if elapsed > args.budget_s else ""

    for name in args.models:
        model, overrides, batch, seq = models[name]
        print(f"[{time.perf_counter() - start:5.0f} s] {name}: train ...", flush=True)
        row = {"model": name, "batch": batch, "seq": seq, "skipped": over_budget()}
        result["train"].append(train_row(name, model, overrides, batch, seq, args, peak) if not row["skipped"] else row)
        save()
        print(f"[{time.perf_counter() - start:5.0f} s] {name}: sampling ...", flush=True)
        result["sampling"] += sampling_rows(name, model, overrides, args, over_budget)
        save()
    result["wall_s"] = time.perf_counter() - start
    save()
    print("\n" + tables(result))
    print(f"\nwritten to {out} ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
