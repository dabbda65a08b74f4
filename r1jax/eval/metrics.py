"""Metrics of an evaluation, from its sample records alone.

A record is one sample: `{"file", "id", "sample", "completion", "answer", "correct",
"finish_reason", "length"}` (answer: the extracted final answer or None; length: completion
tokens). A question is its records with one (file, id); every question has the same k samples.

    pass@1     mean over questions of the fraction of their k samples that are correct (R1's
               pass@1: k samples at temperature 0.6, top-p 0.95), with its standard error
               (std of the per-question rates, ddof=1, / sqrt(questions); 0 for one question)
    pass@k     unbiased pass@k of Chen et al. 2021, 1 - C(n-c, k) / C(n, k); with n = k samples
               it is the share of questions with at least one correct sample
    cons@k     majority vote over the extracted answers of the k samples (None does not vote;
               a tie goes to the answer that appeared first); the question counts iff the voted
               answer is correct, i.e. the first sample that gave it was
    format     share of samples in R1's <think>…</think> <answer>…</answer> format
    mean_length, max_length   completion tokens
    truncated  share of samples cut off by max_tokens (finish_reason "length")

Voting compares answers as strings (whitespace at the ends ignored): "1/2" and "0.5" are two
answers. `compare` pairs two evaluations question by question.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from r1jax.train.rewards import format_reward


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k), as the
    product prod_{i=n-c+1}^{n} (1 - k / i) (no large binomials)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def majority(answers: Sequence[str | None]) -> int | None:
    """Index of the first sample whose answer wins the vote (None answers do not vote; ties go
    to the answer that appeared first), or None when no sample has an answer."""
    counts: collections.Counter = collections.Counter()
    first: dict[str, int] = {}
    for i, a in enumerate(answers):
        if a is None:
            continue
        key = a.strip()
        counts[key] += 1
        first.setdefault(key, i)
    if not counts:
        return None
    best = max(counts.values())
    return min(first[a] for a, n in counts.items() if n == best)


def standard_error(values: Sequence[float]) -> float:
    """std(values, ddof=1) / sqrt(n); 0 for fewer than two values."""
    if len(values) < 2:
        return 0.0
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


def questions(records: Iterable[Mapping]) -> dict[tuple[str, str], list[Mapping]]:
    """(file, id) -> its records in sample order, questions in first-seen order."""
    out: dict[tuple[str, str], list[Mapping]] = {}
    for r in records:
        out.setdefault((r["file"], str(r["id"])), []).append(r)
    return {key: sorted(rs, key=lambda r: r["sample"]) for key, rs in out.items()}


def summarize(records: Sequence[Mapping], k: int) -> dict:
    """{"n", "pass@1", "pass@1_se", f"pass@{k}", f"cons@{k}", "format", "mean_length",
    "max_length", "truncated"} of the records (n: questions)."""
    groups = list(questions(records).values())
    if not groups:
        return {"n": 0}
    for g in groups:
        if len(g) != k:
            raise ValueError(f"question {g[0]['file']}:{g[0]['id']} has {len(g)} samples, not k={k}")
    rates = [float(np.mean([bool(r["correct"]) for r in g])) for g in groups]
    at_k = [pass_at_k(k, sum(bool(r["correct"]) for r in g), k) for g in groups]
    voted = []
    for g in groups:
        winner = majority([r["answer"] for r in g])
        voted.append(winner is not None and bool(g[winner]["correct"]))
    flat = [r for g in groups for r in g]
    completions = [r["completion"] for r in flat]
    lengths = [int(r["length"]) for r in flat]
    return {
        "n": len(groups),
        "pass@1": float(np.mean(rates)),
        "pass@1_se": standard_error(rates),
        f"pass@{k}": float(np.mean(at_k)),
        f"cons@{k}": float(np.mean(voted)),
        # The canonical completion opens its own <think> (see backends.completion_text): no prompt.
        "format": float(np.mean(format_reward([""] * len(flat), completions))),
        "mean_length": float(np.mean(lengths)),
        "max_length": int(max(lengths)),
        "truncated": float(np.mean([r["finish_reason"] == "length" for r in flat])),
    }


def metrics(records: Sequence[Mapping], k: int) -> dict:
    """{file: summary, ..., "overall": summary of all questions pooled}, files in first-seen order."""
    by_file: dict[str, list[Mapping]] = {}
    for r in records:
        by_file.setdefault(r["file"], []).append(r)
    return {**{f: summarize(rs, k) for f, rs in by_file.items()}, "overall": summarize(records, k)}


def _rates(result: Mapping) -> dict[tuple[str, str], float]:
    return {key: float(np.mean([bool(r["correct"]) for r in g])) for key, g in questions(result["records"]).items()}


def _paired(pairs: Sequence[tuple[float, float]]) -> dict:
    a = [x for x, _ in pairs]
    b = [y for _, y in pairs]
    diff = [y - x for x, y in pairs]
    return {"n": len(pairs), "a": float(np.mean(a)) if a else math.nan, "b": float(np.mean(b)) if b else math.nan,
            "diff": float(np.mean(diff)) if diff else math.nan, "se": standard_error(diff)}


def compare(a: Mapping, b: Mapping) -> dict:
    """Paired difference of per-question pass@1, B - A, over the questions both evaluated
    (matched by (file, id)): {"files": {file: {"n", "a", "b", "diff", "se"}}, "overall": {...},
    "unpaired": questions in only one of them}. se: std of the differences (ddof=1) / sqrt(n)."""
    ra, rb = _rates(a), _rates(b)
    shared = [key for key in ra if key in rb]
    by_file: dict[str, list[tuple[float, float]]] = {}
    for key in shared:
        by_file.setdefault(key[0], []).append((ra[key], rb[key]))
    return {"files": {f: _paired(p) for f, p in by_file.items()},
            "overall": _paired([(ra[key], rb[key]) for key in shared]),
            "unpaired": len(ra) + len(rb) - 2 * len(shared)}
