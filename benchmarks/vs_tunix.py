"""r1jax side by side with Tunix (`google-tunix` 0.1.7) on one dense Qwen2-shaped model: sampler,
one GRPO iteration and one SFT step, same weights, batch, lengths and settings, one process.

    pip install -e '.[peers]' && pip install --no-deps google-tunix==0.1.7   # see README
    python benchmarks/vs_tunix.py                      # tiny, best of 3
    python benchmarks/vs_tunix.py --size 0.5b --skip grpo --out runs/vs_tunix_0.5b.json

Weights: one HF Qwen2 directory written here (random f32 weights, untied head; config.json through
`transformers.Qwen2Config`, tensors through safetensors) and loaded by each framework's own
loader: `r1jax.interop.hf.load` / `init_from=<dir>`, and `tunix.models.qwen2.params
.create_model_from_safe_tensors`. Before any timing the benchmark checks that both give the same
logits on one batch (max |diff| <= 1e-4, f32) and the same greedy 32-token completions through
each sampler's public API; it stops otherwise.

Tokens: a word-level tokenizer.json over "w0".."w{V-1}" plus <pad>, <eos>, <unk> *above* the
model's vocabulary, so neither model can emit eos or pad: every row decodes exactly the requested
number of tokens on both sides, and equal lengths mean equal work.

What is timed (compile excluded: one warm-up call or iteration first; best of --repeats with
the range of all repeats; everything float32 on JAX's CPU device):
  sampler   batch 1 and 16, prompts of --prompt-len tokens, --new-tokens new tokens, cache rows of
            prompt + new tokens, greedy and T 0.6 / top-p 0.95.
            prefill tok/s: r1jax `sampling.prefill` (one compiled call), Tunix the sampler's
            compiled prefill (it also samples the first token); rows x prompt / time.
            decode tok/s: r1jax `Engine.step` until done, host loop and read-back included, at
            `BATCH_DECODE_CHUNK` (64) tokens per compiled call as `generate` and GRPO rollouts
            run it, less the prefill timed alone just before (f32 cache), rows x (new - 1) /
            time; Tunix the sampler's compiled decode `while_loop` (one device call for all
            steps); rows x steps / time.
  GRPO      (after GRPO_WARMUP = 2 untimed iterations) --prompts prompts x --generations samples, the same lengths, T 0.6 / top-p 0.95,
            beta 0.04 (k3 KL to a reference copy), clip 0.2, mu 1, one mini-batch (one optimizer
            step), AdamW lr 1e-5 (b 0.9/0.99, no decay), clip-by-norm 1.0; a reward of distinct
            words / words (same Python function on both sides). rollout = sampling + reference
            log-probs + rewards + advantages; update = the optimizer step(s). r1jax:
            `GrpoTrainer.rollout` + `GrpoTrainer.update` (its engine keeps its default bf16 cache);
            Tunix: `GRPOLearner.train`, timed around `_generate_and_compute_advantage` and
            `RLCluster.update_actor`, the iteration around `_run_global_step`.
  SFT       --sft-batch x --sft-len tokens, next-token cross-entropy, global-norm clip 1.0, AdamW
            (lr 3e-4, b 0.9/0.95, eps 1e-8, weight decay 0.1 on matrices). r1jax `TrainStep`;
            Tunix `PeftTrainer`'s jitted train step. Split: forward and forward + backward of
            the same loss as pure jitted functions (backward = the difference, optimizer = step -
            forward + backward: for Tunix that includes nnx.jit's per-call graph handling).

Not asserted anywhere; nothing of Tunix is imported by r1jax or its tests.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tunix_side beside this file

from r1jax import checkpoint as ckpt_lib  # noqa: E402
from r1jax import config as config_lib  # noqa: E402
from r1jax.interop import hf as r1_hf  # noqa: E402
from r1jax.parallel.backend import on_cpu  # noqa: E402
from r1jax.sampling import engine as eng  # noqa: E402
from r1jax.sampling.cache import init_cache  # noqa: E402

# Qwen2 shapes. tiny: configs/model/tiny-dense.yaml's; 0.5b: Qwen2.5-0.5B's, head untied.
SIZES = {
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6),
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, rope_theta=1000000.0, rms_norm_eps=1e-6),
}
PARITY_ATOL = 1e-4
GREEDY_TOKENS = 32
SAMPLED = (0.6, 0.95)  # temperature, top-p
GRPO_BETA, GRPO_EPSILON, GRPO_MU = 0.04, 0.2, 1
# Untimed GRPO iterations first (compiles). Two, as Tunix's second iteration may still compile;
# r1jax's second rollout no longer does (the engine's fresh cache is placed where its steps
# leave it, `engine._home`).
GRPO_WARMUP = 2
GRPO_OPT = dict(learning_rate=1e-5, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, grad_clip=1.0)
SFT_OPT = dict(learning_rate=3e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0)


# ----------------------------------------------------------------------------- shared inputs


def write_hf_dir(directory: Path, shape: dict, seed: int = 0) -> dict:
    """A Qwen2ForCausalLM directory (config.json, model.safetensors, tokenizer.json and its config)
    with random f32 weights; returns the config dict."""
    import safetensors.numpy
    import tokenizers
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    cfg = transformers.Qwen2Config(**shape, max_position_embeddings=4096, tie_word_embeddings=False,
                                   use_sliding_window=False, torch_dtype="float32")
    cfg.save_pretrained(directory)
    v, d, f = shape["vocab_size"], shape["hidden_size"], shape["intermediate_size"]
    h, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    k = d // h
    rng = np.random.default_rng(seed)

    def mat(out_dim, in_dim):
        return (rng.standard_normal((out_dim, in_dim), np.float32) * in_dim**-0.5).astype(np.float32)

    def vec(n, center=0.0, scale=0.1):
        return (center + scale * rng.standard_normal(n, np.float32)).astype(np.float32)

    tensors = {"model.embed_tokens.weight": rng.standard_normal((v, d), np.float32),
               "model.norm.weight": vec(d, 1.0), "lm_head.weight": mat(v, d)}
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": mat(h * k, d), p + "self_attn.q_proj.bias": vec(h * k),
            p + "self_attn.k_proj.weight": mat(kv * k, d), p + "self_attn.k_proj.bias": vec(kv * k),
            p + "self_attn.v_proj.weight": mat(kv * k, d), p + "self_attn.v_proj.bias": vec(kv * k),
            p + "self_attn.o_proj.weight": mat(d, h * k),
            p + "mlp.gate_proj.weight": mat(f, d), p + "mlp.up_proj.weight": mat(f, d),
            p + "mlp.down_proj.weight": mat(d, f),
            p + "input_layernorm.weight": vec(d, 1.0), p + "post_attention_layernorm.weight": vec(d, 1.0),
        }
    safetensors.numpy.save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    # Word-level tokens w0..w{V-1} = the model's ids; <pad>, <eos>, <unk> above them (never emitted).
    vocab = {f"w{i}": i for i in range(v)} | {"<pad>": v, "<eos>": v + 1, "<unk>": v + 2}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>", "pad_token": "<pad>",
         "unk_token": "<unk>", "model_max_length": 4096}))
    return {**json.loads((directory / "config.json").read_text()), **shape}


def text(ids) -> str:
    return " ".join(f"w{int(i)}" for i in ids)


def distinct_word_reward(prompts, completions, **_) -> list[float]:
    """Distinct words / words of each completion: cheap, varied, the same function on both sides."""
    out = []
    for c in completions:
        words = c.split()
        out.append(len(set(words)) / max(len(words), 1))
    return out


def tunix_optimizer(o: dict) -> optax.GradientTransformation:
    """r1jax's `make_optimizer` at a constant rate: clip, then AdamW decaying matrices only."""
    return optax.chain(optax.clip_by_global_norm(o["grad_clip"]), optax.adamw(
        o["learning_rate"], b1=o["b1"], b2=o["b2"], eps=o["eps"], weight_decay=o["weight_decay"],
        mask=lambda params: jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)))


def r1_optim_overrides(o: dict) -> list[str]:
    return [f"optim.{k}={v}" for k, v in o.items()] + ["optim.warmup_steps=0", "optim.decay_steps=0"]


@contextlib.contextmanager
def flax_shard_variables(value: bool):
    """Tunix's import sets flax's `flax_always_shard_variable` to False for everyone in the
    process; each side runs under the value it expects."""
    import flax

    old = flax.config.flax_always_shard_variable
    flax.config.update("flax_always_shard_variable", value)
    try:
        yield
    finally:
        flax.config.update("flax_always_shard_variable", old)


# ----------------------------------------------------------------------------- r1jax


def r1_weights(model):
    w = eng.Weights.of(model)
    return w.unstacked() if on_cpu() else w  # what `Engine` runs on one CPU device, prefill too


def r1_sampler_rates(model, prompts: np.ndarray, new_tokens: int, temperature: float, top_p: float,
                     repeats: int) -> dict:
    b, p = prompts.shape
    max_len = p + new_tokens
    w = r1_weights(model)
    rows = [list(map(int, r)) for r in prompts]

    def prefill_once():
        cache = init_cache(w.cfg, b, max_len, dtype=jnp.float32)
        jax.block_until_ready(cache)
        t0 = time.perf_counter()
        cache, buf = eng.prefill(w, cache, rows, list(range(b)))
        jax.block_until_ready(buf)
        return time.perf_counter() - t0

    # The offline chunk, as generate() and GRPO rollouts run it: with all steps in one call,
    # the decode is the whole engine run less its prefill (timed alone just before).
    engine = eng.Engine(w, slots=b, max_len=max_len, cache_dtype=jnp.float32, decode_chunk=eng.BATCH_DECODE_CHUNK)
    sampling = eng.SamplingParams(temperature=temperature, top_p=top_p, seed=0, max_tokens=new_tokens)

    def decode_once():
        prefill_s = min(prefill_once() for _ in range(3))
        for i, r in enumerate(rows):
            engine.add_request(i, r, sampling, sample_index=i)
        t0 = time.perf_counter()
        while engine.has_work():
            engine.step()
        dt = time.perf_counter() - t0 - prefill_s
        assert all(len(engine.pop_result(i).token_ids) == new_tokens for i in range(b))
        return b * (new_tokens - 1) / dt  # the first token comes with the prefill

    prefill_once(), decode_once()  # compile
    return {"prefill": [b * p / prefill_once() for _ in range(repeats)], "decode": [decode_once() for _ in range(repeats)]}


def r1_greedy(model, prompts: np.ndarray, steps: int) -> list[list[int]]:
    done = eng.generate(model, [list(map(int, r)) for r in prompts], eng.SamplingParams(temperature=0.0, max_tokens=steps),
                        cache_dtype=jnp.float32)
    return [c[0].token_ids for c in done]


def r1_grpo(hf_dir: Path, run_dir: Path, prompt_ids: np.ndarray, *, generations: int, new_tokens: int,
            warmup: int, repeats: int) -> dict:
    from r1jax.train.grpo import GrpoTrainer

    n, p = prompt_ids.shape
    cfg = config_lib.load(
        "configs/tiny-grpo.yaml", f"model={hf_dir}", f"init_from={hf_dir}", f"data.tokenizer={hf_dir}",
        f"run_dir={run_dir}", "mesh.data=1", "mesh.expert=1", "mesh.model=1", "model.dtype=float32",
        "model.param_dtype=float32", f"seq_len={p + new_tokens}", "data.builtin_docs=16", "checkpoint.every=0",
        f"grpo.prompts_per_step={n}", f"grpo.num_generations={generations}",
        f"grpo.max_completion_length={new_tokens}", f"grpo.temperature={SAMPLED[0]}", f"grpo.top_p={SAMPLED[1]}",
        f"grpo.beta={GRPO_BETA}", f"grpo.epsilon_low={GRPO_EPSILON}", f"grpo.epsilon_high={GRPO_EPSILON}",
        f"grpo.mu={GRPO_MU}", "grpo.num_minibatches=1", "grpo.loss_type=grpo", "grpo.dynamic_sampling=false",
        "grpo.eval_prompts=0", "grpo.reward_sandbox=false", "grpo.prompt_template='{question}'",
        "grpo.max_iterations_without_signal=0", "grpo.log_samples_every=0", *r1_optim_overrides(GRPO_OPT))
    trainer = GrpoTrainer(cfg, jax.devices()[:1])
    state, _ = trainer._start()
    records = [{"prompt": text(r), "prompt_ids": list(map(int, r)), "task": "bench", "question": text(r),
                "answer": ""} for r in prompt_ids]
    trainer.prompts = iter(records * (warmup + repeats))
    trainer.reward_fns = [(distinct_word_reward, 1.0)]
    trainer._maybe_reset_reference(state, 0)  # the reference copy (once per run, not per iteration)
    times = {"iteration": [], "rollout": [], "update": []}
    lengths = []
    for it in range(warmup + repeats):
        t0 = time.perf_counter()
        ro = trainer.rollout(state, it)
        t1 = time.perf_counter()
        state, _ = trainer.update(state, ro, it)
        jax.block_until_ready(state)
        t2 = time.perf_counter()
        times["rollout"].append(t1 - t0)
        times["update"].append(t2 - t1)
        times["iteration"].append(t2 - t0)
        lengths.append(float(ro.lengths.mean()))
    trainer.checkpointer.close()
    return {k: v[warmup:] for k, v in times.items()} | {"completion_length": lengths[warmup:]}


def r1_sft(hf_dir: Path, tokens: np.ndarray, repeats: int) -> dict:
    from r1jax.parallel.mesh import make_mesh
    from r1jax.train.step import TrainStep

    b, t = tokens.shape
    cfg = config_lib.load("configs/tiny-sft.yaml", f"model={hf_dir}", "init_from=null", "mesh.data=1",
                          "mesh.expert=1", "mesh.model=1", "model.dtype=float32", "model.param_dtype=float32",
                          "model.remat=none", f"batch_size={b}", f"seq_len={t - 1}", *r1_optim_overrides(SFT_OPT))
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    step = TrainStep(cfg, mesh)
    state = step.init(0)
    params, extra = ckpt_lib.load_params(hf_dir, step.sharded_abstract())
    state = step.place(state.replace(params=params, extra=extra, opt_state=step.optimizer.init(params)))
    # The Tunix side's batch: its loss reads logits of tokens[:, :-1] against tokens[:, 1:] and
    # also runs the forward over the last token; r1jax gets the same T - 1 targets.
    batch = step.place_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                              "loss_mask": np.ones((b, t - 1), np.float32),
                              "segment_ids": np.ones((b, t - 1), np.int32),
                              "positions": np.broadcast_to(np.arange(t - 1, dtype=np.int32), (b, t - 1))})
    holder = {"state": state}

    def one():
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready((holder["state"], metrics))
        return float(metrics["loss"])

    loss0 = one()
    step_s = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        one()
        step_s.append(time.perf_counter() - t0)
    fwd = jax.jit(lambda p, e, bt: step._loss(p, e, bt)[0])
    grads = jax.jit(lambda p, e, bt: step._grads(p, e, bt)[0])
    split = {"forward": [], "forward_backward": []}
    s = holder["state"]
    for key, fn in (("forward", fwd), ("forward_backward", grads)):
        jax.block_until_ready(fn(s.params, s.extra, batch))
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(s.params, s.extra, batch))
            split[key].append(time.perf_counter() - t0)
    return {"step": step_s, "loss0": loss0, **split}


# ----------------------------------------------------------------------------- the run


def best_rate(xs):
    return max(xs)


def best_time(xs):
    return min(xs)


def fmt_rate(xs) -> str:
    return f"{max(xs):,.0f} ({min(xs):,.0f}-{max(xs):,.0f})"


def fmt_ms(xs) -> str:
    return f"{1e3 * min(xs):,.1f} ({1e3 * min(xs):,.1f}-{1e3 * max(xs):,.1f})"


def machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except Exception:
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores visible, JAX {jax.__version__} on {jax.default_backend()}"


def table(r: dict) -> str:
    s = r.get("sampler")
    lines = ["| measure | r1jax | Tunix 0.1.7 | r1jax / Tunix |", "|---|---|---|---|"]
    for mode in ("greedy", "sampled") if s else ():
        for b in r["batches"]:
            for what in ("prefill", "decode"):
                a, t = s["r1jax"][mode][str(b)][what], s["tunix"][mode][str(b)][what]
                label = f"{what} tok/s, batch {b}, {'greedy' if mode == 'greedy' else 'T 0.6 / top-p 0.95'}"
                lines.append(f"| {label} | {fmt_rate(a)} | {fmt_rate(t)} | **{max(a) / max(t):.2f}x** |")
    g = r.get("grpo")
    if g:
        for what in ("iteration", "rollout", "update"):
            a, t = g["r1jax"][what], g["tunix"][what]
            label = f"GRPO {what} ms" + (f" ({r['grpo_shape']})" if what == "iteration" else "")
            bold = "**" if what == "iteration" else ""
            lines.append(f"| {label} | {fmt_ms(a)} | {fmt_ms(t)} | {bold}{min(t) / min(a):.2f}x{bold} |")
    f = r.get("sft")
    if f:
        a, t = f["r1jax"], f["tunix"]
        lines.append(f"| SFT step ms ({r['sft_shape']}) | {fmt_ms(a['step'])} | {fmt_ms(t['step'])} | "
                     f"**{min(t['step']) / min(a['step']):.2f}x** |")
        for side in (a, t):
            side["backward"] = [max(min(side["forward_backward"]) - min(side["forward"]), 0.0)]
            side["optimizer"] = [max(min(side["step"]) - min(side["forward_backward"]), 0.0)]
        for what in ("forward", "backward", "optimizer"):
            x, y = a[what], t[what]
            ratio = f"{min(y) / min(x):.2f}x" if min(x) > 0 else ""
            lines.append(f"| SFT {what} ms (best; backward, optimizer by difference) | {1e3 * min(x):,.1f} | "
                         f"{1e3 * min(y):,.1f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="runs/vs_tunix.json")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompts", type=int, default=8, help="GRPO prompts per iteration")
    ap.add_argument("--generations", type=int, default=4, help="GRPO samples per prompt")
    ap.add_argument("--sft-batch", type=int, default=8)
    ap.add_argument("--sft-len", type=int, default=128)
    ap.add_argument("--skip", nargs="*", default=[], choices=["sampler", "grpo", "sft"])
    ap.add_argument("--workdir", default=None, help="where the HF directory and run dirs go (default: a temp dir)")
    args = ap.parse_args(argv)

    try:
        with flax_shard_variables(False):
            import tunix_side as tx  # noqa: F401  (imports tunix)
    except ImportError as e:
        raise SystemExit(f"Tunix is not installed ({e}). See README 'Side by side with Tunix': "
                         "pip install -e '.[peers]' && pip install --no-deps google-tunix==0.1.7")
    r1_shard = True  # flax's default, what r1jax runs with

    work = Path(args.workdir or tempfile.mkdtemp(prefix="vs_tunix_"))
    hf_dir = work / f"qwen2-{args.size}"
    started = time.perf_counter()
    hf = write_hf_dir(hf_dir, SIZES[args.size])
    v, p, n_new = hf["vocab_size"], args.prompt_len, args.new_tokens
    pad_id, eos_id = v, v + 1
    rng = np.random.default_rng(1)
    result = {"date": datetime.date.today().isoformat(), "machine": machine(), "size": args.size,
              "config": {k: hf[k] for k in SIZES[args.size]}, "repeats": args.repeats, "prompt_len": p,
              "new_tokens": n_new, "batches": args.batches,
              "command": "python benchmarks/vs_tunix.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(f"{result['date']}  {result['machine']}\nQwen2 {args.size}: {result['config']}  (HF dir {hf_dir})")
    m = tx.mesh()
    tok = tx.WordTokenizer(hf_dir / "tokenizer.json", pad_id, eos_id)

    # ---- the same weights: logits and greedy decodes agree before anything is timed
    with flax_shard_variables(r1_shard):
        r1_model, r1_tok = r1_hf.load(hf_dir)  # float32 for HF directories (its dtype= argument trips on them)
    assert r1_tok.eos_id == eos_id and r1_tok.encode(text([5, 7])) == [5, 7], "tokenizer mismatch"
    with flax_shard_variables(False):
        tx_model = tx.load(hf_dir, hf, m)
    ids = rng.integers(0, v, (2, p), dtype=np.int32)
    diff = float(np.abs(np.asarray(r1_model(jnp.asarray(ids)).logits, np.float32) - tx.logits(tx_model, ids, m)).max())
    greedy_prompts = rng.integers(0, v, (4, p), dtype=np.int32)
    with flax_shard_variables(r1_shard):
        r1_greedy_out = r1_greedy(r1_model, greedy_prompts, GREEDY_TOKENS)
    with flax_shard_variables(False):
        tx_greedy_out = tx.greedy(tx.make_sampler(tx_model, tok, p + GREEDY_TOKENS + 8),
                                  [text(r) for r in greedy_prompts], GREEDY_TOKENS, p, eos_id, m)
    same = r1_greedy_out == tx_greedy_out
    result["parity"] = {"max_abs_logit_diff": diff, "greedy_equal": same, "greedy_tokens": GREEDY_TOKENS}
    print(f"parity: max |logits r1jax - Tunix| = {diff:.2e} (limit {PARITY_ATOL:g}); greedy {GREEDY_TOKENS}-token "
          f"decodes of {len(greedy_prompts)} prompts equal: {same}")
    if not (diff <= PARITY_ATOL and same):
        for a, b in zip(r1_greedy_out, tx_greedy_out):
            print(" r1jax", a, "\n Tunix", b)
        raise SystemExit("the two frameworks do not run the same model: nothing timed")

    # ---- sampler
    if "sampler" not in args.skip:
        s_res = {"r1jax": {}, "tunix": {}}
        tx_sampler = tx.make_sampler(tx_model, tok, p + n_new)
        for mode, (temp, top_p) in (("greedy", (0.0, 1.0)), ("sampled", SAMPLED)):
            for side in s_res.values():
                side[mode] = {}
            for b in args.batches:
                prompts = rng.integers(0, v, (b, p), dtype=np.int32)
                with flax_shard_variables(r1_shard):
                    s_res["r1jax"][mode][str(b)] = r1_sampler_rates(r1_model, prompts, n_new, temp, top_p, args.repeats)
                with flax_shard_variables(False):
                    s_res["tunix"][mode][str(b)] = tx.sampler_rates(
                        tx_sampler, prompts, n_new, eos_id, temp, top_p if mode == "sampled" else None, args.repeats, m)
                print(f"sampler {mode} batch {b}: " + "; ".join(
                    f"{name} prefill {fmt_rate(x[mode][str(b)]['prefill'])} decode {fmt_rate(x[mode][str(b)]['decode'])}"
                    for name, x in s_res.items()), flush=True)
        result["sampler"] = s_res
        del tx_sampler
    del r1_model, tx_model
    gc.collect()

    # ---- one GRPO iteration
    if "grpo" not in args.skip:
        prompt_ids = rng.integers(0, v, (args.prompts, p), dtype=np.int32)
        result["grpo_shape"] = f"{args.prompts} x {args.generations}, {p} + {n_new} tokens"
        with flax_shard_variables(r1_shard):
            r1 = r1_grpo(hf_dir, work / "r1jax-grpo", prompt_ids, generations=args.generations, new_tokens=n_new,
                         warmup=GRPO_WARMUP, repeats=args.repeats)
        gc.collect()
        with flax_shard_variables(False), tx.quiet():
            texts = [text(r) for r in prompt_ids]
            t = tx.grpo_iterations(hf_dir, hf, tok, texts, generations=args.generations, prompt_len=p, new_tokens=n_new,
                                   temperature=SAMPLED[0], top_p=SAMPLED[1], beta=GRPO_BETA, epsilon=GRPO_EPSILON,
                                   mu=GRPO_MU, optimizer=tunix_optimizer(GRPO_OPT), reward_fn=distinct_word_reward,
                                   eos=eos_id, warmup=GRPO_WARMUP, repeats=args.repeats, m=m)
        gc.collect()
        result["grpo"] = {"r1jax": r1, "tunix": t}
        print(f"GRPO iteration ms: r1jax {fmt_ms(r1['iteration'])} (rollout {fmt_ms(r1['rollout'])}, update "
              f"{fmt_ms(r1['update'])}); Tunix {fmt_ms(t['iteration'])} (rollout {fmt_ms(t['rollout'])}, update "
              f"{fmt_ms(t['update'])}); completion lengths {r1['completion_length']} / {t['completion_length']}",
              flush=True)

    # ---- one SFT step
    if "sft" not in args.skip:
        tokens = rng.integers(0, v, (args.sft_batch, args.sft_len), dtype=np.int32)
        result["sft_shape"] = f"{args.sft_batch} x {args.sft_len} tokens"
        with flax_shard_variables(r1_shard):
            r1 = r1_sft(hf_dir, tokens, args.repeats)
        gc.collect()
        with flax_shard_variables(False), tx.quiet():
            t = tx.sft_step(hf_dir, hf, tokens, tunix_optimizer(SFT_OPT), args.repeats, m)
        gc.collect()
        result["sft"] = {"r1jax": r1, "tunix": t}
        print(f"SFT step ms: r1jax {fmt_ms(r1['step'])} (first loss {r1['loss0']:.4f}); Tunix {fmt_ms(t['step'])} "
              f"(first loss {t['loss0']:.4f})", flush=True)

    result["wall_s"] = time.perf_counter() - started
    result["table"] = table(result)
    print("\n" + result["table"])
    print(f"\n{result['command']}  ({result['wall_s']:.0f} s)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
