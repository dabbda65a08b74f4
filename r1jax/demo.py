"""`make demo`: what r1jax can do today, on this machine, in about a minute.

1. Model summaries (parameter counts from `jax.eval_shape`, nothing allocated) of the tiny CPU
   config and of DeepSeek-V3 / R1 671B.
2. The tiny model's compiled train step (forward, backward, AdamW, routing-bias update) on a
   synthetic batch: compile time, step time, tokens/s, and the loss over a few steps.
"""

from __future__ import annotations

import sys
import time

import jax

from r1jax import config as config_lib
from r1jax.model.summary import summary, train_flops_per_token
from r1jax.train.step import TrainStep, synthetic_batch

TINY = "configs/model/tiny-moe.yaml"
V3 = "configs/model/deepseek-v3-671b.yaml"


def main(argv: list[str]) -> None:
    steps = int(argv[0]) if argv else 20
    for path in (TINY, V3):
        print(path)
        print(summary(config_lib.load_model(path)))
        print()

    cfg = config_lib.load(TINY, "batch_size=8", "seq_len=128", "optim.learning_rate=3e-3")
    step = TrainStep(cfg)
    state = step.init(cfg.seed)
    batch = synthetic_batch(cfg, jax.random.key(1))
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    first = float(metrics["loss"])
    t0 = time.perf_counter()
    for _ in range(steps - 1):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - t0) / max(steps - 1, 1)
    tokens = cfg.batch_size * cfg.seq_len
    flops = train_flops_per_token(cfg.model, cfg.seq_len) * tokens
    print(f"tiny-moe train step (batch {cfg.batch_size} x {cfg.seq_len}, {jax.device_count()} CPU devices, one used)")
    print(f"  compile + first step      {compile_s:.1f} s")
    print(f"  step time                 {step_s * 1e3:.0f} ms  ({tokens / step_s:,.0f} tokens/s, {flops / step_s / 1e9:.2f} GFLOP/s)")
    print(f"  loss over {steps} steps on one batch  {first:.3f} -> {float(metrics['loss']):.3f}")
    print(f"  expert load max/mean (worst MoE layer)  {float(metrics['expert_load_max_over_mean_worst']):.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
