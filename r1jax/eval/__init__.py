"""Evaluation on math benchmarks and the built-in tasks, as R1 reports it (`python -m r1jax.eval`).

    from r1jax import eval as r1eval
    result = r1eval.evaluate(checkpoint="runs/demo/grpo", data=["gsm8k.jsonl", "builtin"], k=8, out="eval.json")
    print(r1eval.format_table(result))
    print(r1eval.format_compare(r1eval.compare(before, after)))

    # a model already in memory (a recipe between stages):
    questions = r1eval.render(r1eval.load_questions(["builtin"], cfg=cfg, tokenizer=tok), tok)
    fn = r1eval.engine_generate_fn(Engine(model, slots=64, max_len=512), tok, temperature=0.6, max_tokens=256)
    result = r1eval.evaluate_with(fn, questions, k=8, seed=0)

Modules: `benchmarks` (files -> question records, answer checks), `backends` (samples from the
engine or an OpenAI-compatible server), `metrics` (pass@1 ± se, pass@k, cons@k, format,
lengths, truncation; `compare`), `harness` (the loop: per-question seeds, resumable chunks, the
result JSON and its table). The result dict is the `out=` JSON (see `harness`).
"""

from r1jax.eval.backends import GenerateFn, Sample, endpoint_generate_fn, engine_generate_fn
from r1jax.eval.benchmarks import BenchmarkError, render
from r1jax.eval.benchmarks import load as load_questions
from r1jax.eval.harness import evaluate, evaluate_with, format_compare, format_table, question_seed
from r1jax.eval.metrics import compare, pass_at_k

__all__ = ["BenchmarkError", "GenerateFn", "Sample", "compare", "endpoint_generate_fn", "engine_generate_fn",
           "evaluate", "evaluate_with", "format_compare", "format_table", "load_questions", "pass_at_k",
           "question_seed", "render"]
