"""`make demo`: the miniature R1 on this machine's CPU, end to end.

1. Model summaries (from `jax.eval_shape`, nothing allocated): the tiny config and V3/R1 671B.
2. Tokenizer -> pretraining on the built-in task corpus -> cold-start SFT on <think>/<answer>
   chats -> GRPO with rule-based rewards -> held-out evaluation of the base, SFT and GRPO
   checkpoints (pass@1 over k samples at T 0.6 / top-p 0.95, and greedy accuracy).

    python -m r1jax.demo [runs/demo] [key=value ...]   (overrides apply to every stage)
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from r1jax import config as config_lib
from r1jax.model.summary import summary

TINY = "configs/model/tiny-moe.yaml"
V3 = "configs/model/deepseek-v3-671b.yaml"
# One easy task (2-digit addition / subtraction with column traces) and short runs: the tiny
# model learns it well enough in pretraining + SFT for GRPO to have signal, in ~20 min on 2 cores.
COMMON = ("data.tasks=[arithmetic]", "data.max_difficulty=1", "mesh.data=-1")


def _stage(name: str, path: str, run_dir: Path, *overrides: str):
    cfg = config_lib.load(path, f"run_dir={run_dir / name}", *COMMON, *overrides)
    print(f"\n== {name}: {path} ({cfg.steps} steps)", flush=True)
    return cfg


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.WARNING)
    run_dir = Path(argv[0]) if argv and "=" not in argv[0] else Path("runs/demo")
    extra = [a for a in argv if "=" in a]
    t0 = time.perf_counter()
    if run_dir.exists():  # each stage resumes its checkpoints: a finished one is only re-evaluated
        print(f"{run_dir} exists: its stages resume from their checkpoints (to start over: make clean, or "
              f"python -m r1jax.demo OTHER_DIR)")
    for path in (TINY, V3):
        print(path)
        print(summary(config_lib.load_model(path)))

    from r1jax.train.grpo import GrpoTrainer, prompt_records
    from r1jax.train.loop import train

    pre = _stage("pretrain", "configs/tiny-pretrain.yaml", run_dir, *extra)
    pre_summary = train(pre)
    print(pre_summary.table())
    sft = _stage("sft", "configs/tiny-sft.yaml", run_dir, f"init_from={pre.run_dir}", *extra)
    sft_summary = train(sft)
    print(sft_summary.table())
    grpo = _stage("grpo", "configs/tiny-grpo.yaml", run_dir, f"init_from={sft.run_dir}",
                  f"data.tokenizer={Path(pre.run_dir) / 'tokenizer.model'}", *extra)
    trainer = GrpoTrainer(grpo)
    result = trainer.train()

    # The same held-out prompts, samples and seeds for every checkpoint.
    from r1jax.checkpoint import load_params

    target = (trainer.step_fn.abstract.params, trainer.step_fn.abstract.extra)

    def evaluate(path):
        params, extra_state = load_params(path, target)
        return trainer.evaluate(trainer.step_fn.place(trainer.step_fn.init(0).replace(params=params, extra=extra_state)))

    # A fresh GRPO run evaluated its starting point, the SFT checkpoint, before its first step;
    # a resumed one did not.
    sft_eval = result["first_eval"] or evaluate(sft.run_dir)
    rows = [("base (pretrained)", evaluate(pre.run_dir)), ("cold-start SFT", sft_eval), ("GRPO", result["final_eval"])]
    k = grpo.grpo.eval_samples
    n = len(prompt_records(grpo, trainer.tokenizer, "eval"))
    print(f"\n== held-out built-in tasks ({n} prompts, pass@1 over k={k} samples at T 0.6, top-p 0.95)")
    print(f"  {'checkpoint':<20}{'pass@1':>8}{'greedy':>8}{'format':>8}")
    for name, ev in rows:
        print(f"  {name:<20}{ev['pass@1']:>8.3f}{ev['greedy_accuracy']:>8.3f}{ev['format']:>8.3f}")
    total = result["rollout_s"] + result["update_s"]
    print(f"\nGRPO: rollout {result['rollout_s']:.0f} s ({result['rollout_tokens_per_s']:,.0f} tokens/s), "
          f"update {result['update_s']:.0f} s ({100 * result['update_s'] / max(total, 1e-9):.0f}% of the loop)")
    print(f"curves: {pre_summary.plot}, {sft_summary.plot}, {result['plot']}")
    print(f"checkpoints and params under {run_dir}/; serve the GRPO model with: python serve.py checkpoint={grpo.run_dir}")
    print(f"demo wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
