"""Held-out evaluation of the built-in tasks, as R1 reports it: pass@1 averaged over k samples
at temperature 0.6 and top-p 0.95, and greedy accuracy."""

from __future__ import annotations

import numpy as np

from r1jax.data.tasks import check_record
from r1jax.data.tokenizer import Tokenizer
from r1jax.sampling.engine import SamplingParams, generate
from r1jax.train.rewards import format_reward


def evaluate_tasks(model_or_state, tokenizer: Tokenizer, records: list[dict], *, k: int = 4, max_tokens: int = 64,
                   seed: int = 0, max_len: int | None = None, temperature: float = 0.6, top_p: float = 0.95) -> dict:
    """records: {"prompt_ids", "prompt", "task", "question", "answer"} (see `grpo.prompt_records`).
    Returns pass@1 (mean over prompts of the fraction of k samples that are correct), greedy
    accuracy, and the share of samples in the <think>…</think> <answer>…</answer> format."""
    prompts = [r["prompt_ids"] for r in records]
    stop = (tokenizer.eos_id,)
    kwargs = dict(tokenizer=tokenizer, max_len=max_len)
    sampled = generate(model_or_state, prompts, SamplingParams(temperature=temperature, top_p=top_p, seed=seed,
                                                               max_tokens=max_tokens, stop_token_ids=stop), n=k, **kwargs)
    greedy = generate(model_or_state, prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                              stop_token_ids=stop), n=1, **kwargs)

    def text(c):
        return tokenizer.decode([t for t in c.token_ids if t != tokenizer.eos_id])

    correct = np.array([[check_record(text(c), r) for c in cs] for cs, r in zip(sampled, records)], np.float32)
    greedy_ok = np.array([check_record(text(cs[0]), r) for cs, r in zip(greedy, records)], np.float32)
    texts = [text(c) for cs in sampled for c in cs]
    formats = format_reward([r["prompt"] for r in records for _ in range(k)], texts)
    return {"pass@1": float(correct.mean()), "greedy_accuracy": float(greedy_ok.mean()),
            "format": float(np.mean(formats))}
