"""Train-step tokens/s and MFU of r1jax against HF transformers' DeepseekV3ForCausalLM (torch, CPU).

    python benchmarks/train_step.py                                  # tiny-moe and small-moe, both frameworks
    python benchmarks/train_step.py --configs tiny-moe --steps 10    # one config
    python benchmarks/train_step.py --configs small-moe --skip-hf    # r1jax only
    python benchmarks/train_step.py --breakdown                      # + forward / backward / optimizer times

Both sides run the same model, built from configs/model/<name>.yaml in float32 (small-moe's
bf16 compute dtype is overridden) with the same weights (r1jax's init, copied into HF through
`r1jax.interop.hf.to_hf_state_dict`, so routing and the first loss agree), the same random
batch (B x T next-token targets), and one full optimizer step: forward, cross-entropy, backward,
global-norm clipping at 1.0, AdamW (lr 3e-4, betas 0.9/0.95, eps 1e-8, weight decay 0.1).
HF has no MTP module, so r1jax runs with num_nextn_predict_layers=0 unless --mtp (then the
r1jax row includes MTP and its FLOPs, and the ratio is no longer like for like). r1jax's step
also does the aux-loss-free routing-bias update, the sequence balance loss and a non-finite
guard; HF's does not.

Step time: the first call (r1jax: compile) and --warmup-1 more steps are left out, then the
median of --steps timed steps. MFU = train_flops_per_token(cfg, T) * tokens/s / peak, the peak
being a jitted f32 2048x2048 GEMM measured at start-up (`measure_peak_flops`, JAX's default
device); both frameworks are divided by that same peak (torch's own GEMM peak is printed too).
On a shared CPU other jobs move every number: compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # HF runs on torch CPU: compare on the same cores

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from r1jax import config as config_lib  # noqa: E402
from r1jax.config import ModelConfig  # noqa: E402
from r1jax.model.summary import train_flops_per_token  # noqa: E402
from r1jax.parallel.mesh import make_mesh  # noqa: E402
from r1jax.train.metrics import measure_peak_flops  # noqa: E402
from r1jax.train.step import TrainStep, synthetic_batch  # noqa: E402

# Per config: (batch, seq_len, timed steps). small-moe (402M parameters, 149M active) at 1 x 128:
# r1jax's CPU step then needs ~13 GB (4.8 GB state, 8.3 GB temporaries, most of them the per-block
# expert weights the blocked MoE gathers and keeps for the backward pass); 1 x 256 needs ~17 GB.
DEFAULTS = {"tiny-moe": (8, 128, 10), "small-moe": (1, 128, 3)}
LR, BETAS, EPS, WEIGHT_DECAY, CLIP = 3e-4, (0.9, 0.95), 1e-8, 0.1, 1.0


def run_config(name: str, batch: int, seq: int, mtp: bool, extra: tuple[str, ...] = ()) -> config_lib.Config:
    model = f"configs/model/{name}.yaml" if not name.endswith(".yaml") else name
    overrides = [f"batch_size={batch}", f"seq_len={seq}", "mesh.data=1", "mesh.expert=1", "mesh.model=1",
                 "model.dtype=float32", "model.param_dtype=float32", "model.remat=none",
                 f"optim.learning_rate={LR}", f"optim.b1={BETAS[0]}", f"optim.b2={BETAS[1]}", f"optim.eps={EPS}",
                 f"optim.weight_decay={WEIGHT_DECAY}", f"optim.grad_clip={CLIP}"]
    if not mtp:
        overrides.append("model.num_nextn_predict_layers=0")
    return config_lib.load(model, *overrides, *extra)


def hf_config(m: ModelConfig):
    """The transformers DeepseekV3Config of an r1jax MLA + MoE ModelConfig (no MTP)."""
    import transformers as tf

    if m.rope_scaling is None:
        rope = dict(rope_type="default", rope_theta=m.rope_theta)
    else:
        r = m.rope_scaling
        if r.type != "yarn":
            raise ValueError(f"rope_scaling {r.type!r}: only yarn is mapped")
        rope = dict(rope_type="yarn", rope_theta=m.rope_theta, factor=r.factor,
                    original_max_position_embeddings=r.original_max_position_embeddings, beta_fast=r.beta_fast,
                    beta_slow=r.beta_slow, mscale=r.mscale, mscale_all_dim=r.mscale_all_dim)
    if not (m.is_mla and m.is_moe and m.scoring_func == "sigmoid" and m.topk_method == "noaux_tc"):
        raise ValueError("HF DeepseekV3 needs MLA, MoE and sigmoid / noaux_tc routing")
    return tf.DeepseekV3Config(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        moe_intermediate_size=m.moe_intermediate_size, num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads, num_key_value_heads=m.kv_heads,
        n_shared_experts=m.n_shared_experts, n_routed_experts=m.n_routed_experts,
        routed_scaling_factor=m.routed_scaling_factor, kv_lora_rank=m.kv_lora_rank, q_lora_rank=m.q_lora_rank,
        qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim, qk_nope_head_dim=m.qk_nope_head_dim,
        n_group=m.n_group, topk_group=m.topk_group, num_experts_per_tok=m.num_experts_per_tok,
        first_k_dense_replace=m.first_k_dense_replace, norm_topk_prob=m.norm_topk_prob,
        max_position_embeddings=m.max_position_embeddings, rms_norm_eps=m.rms_norm_eps,
        tie_word_embeddings=m.tie_word_embeddings, rope_parameters=rope, rope_interleave=m.rope_interleave,
        attention_bias=False, attention_dropout=0.0, use_cache=False, num_mtp_layers=0,
        initializer_range=m.initializer_range,
    )


def _time_steps(fn, warmup: int, steps: int) -> tuple[float, list[float]]:
    """(first call s, timed step times s): fn() runs one step and blocks until it is done."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, times


# ----------------------------------------------------------------------------- r1jax


def bench_r1jax(cfg: config_lib.Config, warmup: int, steps: int, breakdown: bool, want_hf_weights: bool):
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    step = TrainStep(cfg, mesh)
    state = step.init(0)
    n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params)))
    batch_np = jax.device_get(synthetic_batch(cfg, jax.random.key(1)))
    batch = step.place_batch(batch_np)
    holder = {"state": state}
    losses = []

    def one():
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready((holder["state"], metrics))
        losses.append(float(metrics["loss"]))

    first, times = _time_steps(one, warmup, steps)
    result = dict(params=n_params, first_s=first, step_s=statistics.median(times), loss0=losses[0])
    if breakdown:  # interleaved rounds (forward, value_and_grad, full step): the CPU's load hits all alike
        fwd = jax.jit(lambda p, e, b: step._loss(p, e, b)[0])
        grads = jax.jit(lambda p, e, b: step._grads(p, e, b)[0])
        split = {"forward": [], "grads": [], "step": []}

        def timed(key, fn):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            split[key].append(time.perf_counter() - t0)

        for _ in range(warmup + steps):
            p_, e_ = holder["state"].params, holder["state"].extra
            timed("forward", lambda p=p_, e=e_: fwd(p, e, batch))
            timed("grads", lambda p=p_, e=e_: grads(p, e, batch))
            del p_, e_  # the step below donates them
            timed("step", one)
        med = {k: statistics.median(v[warmup:]) for k, v in split.items()}
        result.update(forward_s=med["forward"], backward_s=med["grads"] - med["forward"],
                      optimizer_s=med["step"] - med["grads"])
    holder.clear()  # the state's memory goes back before the HF copy is made
    del state
    gc.collect()
    hf_weights = None
    if want_hf_weights:  # the same init again (seed 0), converted only now: never two states in memory
        from r1jax.interop.hf import to_hf_state_dict

        fresh = step.init(0)
        model = nnx.merge(step.graphdef, jax.device_get(fresh.params), jax.device_get(fresh.extra))
        del fresh
        hf_weights = {k: np.array(v, np.float32) for k, v in to_hf_state_dict(model).items()}  # writable copies
        del model
        gc.collect()
    return result, batch_np, hf_weights


# ----------------------------------------------------------------------------- transformers


def bench_hf(cfg: config_lib.Config, batch_np: dict, weights: dict | None, warmup: int, steps: int, breakdown: bool):
    import torch
    import torch.nn.functional as F
    import transformers as tf

    tf.logging.set_verbosity_error()
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    model = tf.DeepseekV3ForCausalLM(hf_config(cfg.model)).float()
    if weights is not None:
        missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
        missing = [k for k in missing if not k.endswith("e_score_correction_bias")]  # r1jax's bias: zeros at init
        if missing or unexpected:
            raise ValueError(f"HF weights: missing {missing[:4]}, unexpected {unexpected[:4]}")
        weights.clear()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    inputs = torch.from_numpy(np.asarray(batch_np["inputs"], np.int64))
    targets = torch.from_numpy(np.asarray(batch_np["targets"], np.int64))
    positions = torch.from_numpy(np.asarray(batch_np["positions"], np.int64))
    split = {"forward": [], "backward": [], "optimizer": []}
    losses = []

    def one():
        t0 = time.perf_counter()
        logits = model(input_ids=inputs, position_ids=positions, use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        losses.append(loss.item())
        for k, dt in zip(split, (t1 - t0, t2 - t1, t3 - t2)):
            split[k].append(dt)

    first, times = _time_steps(one, warmup, steps)
    result = dict(params=n_params, first_s=first, step_s=statistics.median(times), loss0=losses[0],
                  experts_impl=getattr(model.config, "_experts_implementation", None),
                  attn_impl=getattr(model.config, "_attn_implementation", None))
    if breakdown:
        for k, v in split.items():
            result[f"{k}_s"] = statistics.median(v[-steps:])
    return result


def torch_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    import torch

    torch.set_num_threads(os.cpu_count())
    a = torch.ones(n, n)
    a @ a
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


# ----------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=["tiny-moe", "small-moe"], help="model configs (configs/model/NAME.yaml)")
    p.add_argument("--batch", type=int, help="sequences per step (default: per config, tiny 8, small 1)")
    p.add_argument("--seq", type=int, help="sequence length (default: 128)")
    p.add_argument("--steps", type=int, help="timed steps (default: per config, tiny 10, small 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps, the first (compile) included")
    p.add_argument("--skip-hf", action="store_true", help="r1jax only")
    p.add_argument("--mtp", action="store_true", help="keep r1jax's MTP module (HF has none: not like for like)")
    p.add_argument("--breakdown", action="store_true", help="also time forward, backward and optimizer")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="r1jax config overrides, e.g. model.scan_unroll=1 (the default: each config's own)")
    args = p.parse_args()

    peak = measure_peak_flops()
    line = f"measured peak: {peak / 1e9:.1f} GFLOP/s (JAX f32 2048^3 GEMM, {jax.default_backend()})"
    if not args.skip_hf:
        line += f"; torch's own GEMM: {torch_peak_flops() / 1e9:.1f} GFLOP/s"
    print(line, f"; {os.cpu_count()} CPU cores", flush=True)

    rows = []
    for name in args.configs:
        b, t, n = DEFAULTS.get(name, (8, 128, 5))
        b, t, n = args.batch or b, args.seq or t, args.steps or n
        cfg = run_config(name, b, t, args.mtp, tuple(args.set))
        flops_tok = train_flops_per_token(cfg.model, t)
        print(f"[{name}] B={b} T={t}: r1jax ...", flush=True)
        res, batch_np, weights = bench_r1jax(cfg, args.warmup, n, args.breakdown, want_hf_weights=not args.skip_hf)
        rows.append((name, "r1jax" + ("+mtp" if args.mtp else ""), b, t, flops_tok, res))
        if not args.skip_hf:
            print(f"[{name}] B={b} T={t}: transformers ...", flush=True)
            rows.append((name, "hf-torch", b, t, flops_tok, bench_hf(cfg, batch_np, weights, args.warmup, n,
                                                                     args.breakdown)))

    head = (f"{'config':<11}{'framework':<11}{'params':>9}{'B x T':>10}{'1st s':>8}{'step ms':>10}"
            f"{'tok/s':>9}{'MFU %':>7}{'loss0':>8}{'speedup':>9}")
    print("\n" + head + "\n" + "-" * len(head))
    speed = {}
    for name, fw, b, t, flops_tok, r in rows:
        tps = b * t / r["step_s"]
        speed[(name, fw.split("+")[0])] = tps
        ratio = ""
        if fw == "hf-torch" and (name, "r1jax") in speed:
            ratio = f"{speed[(name, 'r1jax')] / tps:.2f}x"
        print(f"{name:<11}{fw:<11}{r['params'] / 1e6:>8.1f}M{f'{b} x {t}':>10}{r['first_s']:>8.1f}"
              f"{r['step_s'] * 1e3:>10.0f}{tps:>9.0f}{100 * flops_tok * tps / peak:>7.1f}{r['loss0']:>8.3f}{ratio:>9}")
    print("speedup: r1jax tokens/s over HF's, on the hf-torch row. 1st s: first step (r1jax: with compile).")
    hf_rows = [r for *_, r in rows if "experts_impl" in r]
    if hf_rows:
        print(f"HF: attention={hf_rows[0]['attn_impl']}, experts={hf_rows[0]['experts_impl']}, "
              f"torch threads={os.cpu_count()}.")
    if args.breakdown:
        print(f"\n{'config':<11}{'framework':<11}{'forward ms':>12}{'backward ms':>13}{'optimizer ms':>14}")
        for name, fw, *_, r in rows:
            print(f"{name:<11}{fw:<11}{r['forward_s'] * 1e3:>12.0f}{r['backward_s'] * 1e3:>13.0f}"
                  f"{r['optimizer_s'] * 1e3:>14.0f}")
        print("r1jax: forward = jitted loss; backward = jitted value_and_grad less forward; optimizer = "
              "full step less value_and_grad (clip, AdamW, bias update, guard); each a median of interleaved "
              "runs, so the three are differences of separately compiled programs (small ones can go negative).")


if __name__ == "__main__":
    main()
