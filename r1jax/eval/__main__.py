"""Evaluates a checkpoint or a server on math benchmarks and the built-in tasks.

    python -m r1jax.eval [CONFIG] checkpoint=PATH|endpoint=URL data=A.jsonl[,B.jsonl|builtin] k=8 out=RESULT.json
        [temperature=0.6] [top_p=0.95] [max_tokens=N] [seed=0] [prompts=64] [format=gsm8k|math|aime]
        [template=...{question}...] [batch_prompts=32] [slots=N] [model=NAME] [api_key=KEY] [tokenizer=FILE]
        [progress=true] [key=value config overrides ...]
    python -m r1jax.eval --compare A.json B.json

checkpoint: an r1jax run dir, a params export or an HF model directory (sampled in process);
endpoint: an OpenAI-compatible server's base URL, e.g. http://127.0.0.1:8000/v1 (serve.py).
data: JSONL files (GSM8K, MATH / MATH-500, AIME-style; detected from the keys or format=) and
`builtin` (the config's held-out built-in task split, prompts= of them). max_tokens defaults to
the checkpoint config's grpo.max_completion_length, else 512; temperature=0 is greedy.
Prints a table (per file and overall: n, pass@1 ± se, pass@k, cons@k, format, mean / max length,
truncated, rates in percent) and writes the result JSON to out= (a re-run with the same
arguments resumes from OUT.partial.jsonl). --compare prints B - A of per-question pass@1,
paired by question, with its standard error.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

OPTIONS = {"checkpoint": str, "endpoint": str, "data": str, "k": int, "out": str, "temperature": float,
           "top_p": float, "max_tokens": int, "seed": int, "prompts": int, "format": str, "template": str,
           "batch_prompts": int, "slots": int, "model": str, "api_key": str, "tokenizer": str, "progress": bool}


def _compare(paths: Sequence[str]) -> int:
    from r1jax.eval import compare, format_compare

    if len(paths) != 2:
        print("usage: python -m r1jax.eval --compare A.json B.json", file=sys.stderr)
        return 2
    try:
        a, b = (json.loads(Path(p).read_text(encoding="utf-8")) for p in paths)
        print(format_compare(compare(a, b), *paths))
    except (OSError, ValueError, KeyError) as e:
        print(f"compare: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    if argv[0] == "--compare":
        return _compare(argv[1:])
    from r1jax import config as config_lib
    from r1jax.eval import BenchmarkError, evaluate, format_table
    from r1jax.eval.backends import EndpointError

    try:
        positionals, o, overrides = config_lib.parse_options(argv, OPTIONS, positional=("[CONFIG]",))
        if ("checkpoint" in o) == ("endpoint" in o):
            raise config_lib.ConfigError("checkpoint", "pass exactly one of checkpoint=PATH and endpoint=URL")
        if "data" not in o:
            raise config_lib.ConfigError("data", "data=FILE[,FILE|builtin] is required")
        config_lib.require_positive(o, "k", "max_tokens", "prompts", "batch_prompts", "slots")
        if positionals:
            config_lib.load(positionals[0], *overrides)  # a bad override fails before any loading
    except config_lib.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    options = {key: o[key] for key in ("format", "template", "batch_prompts", "tokenizer", "slots", "model", "api_key",
                                       "progress") if key in o}
    if positionals:
        options["config"] = positionals[0]
    try:
        result = evaluate(checkpoint=o.get("checkpoint"), endpoint=o.get("endpoint"),
                          data=[d for d in o["data"].split(",") if d], k=o.get("k", 8), out=o.get("out"),
                          temperature=o.get("temperature", 0.6), top_p=o.get("top_p", 0.95),
                          max_tokens=o.get("max_tokens"), seed=o.get("seed", 0), prompts=o.get("prompts", 64),
                          overrides=overrides, **options)
    except BenchmarkError as e:
        print(f"data: {e}", file=sys.stderr)
        return 2
    except config_lib.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (EndpointError, FileNotFoundError, OSError) as e:
        print(f"{'endpoint' if isinstance(e, EndpointError) else 'checkpoint'}: {e}", file=sys.stderr)
        return 1
    print(format_table(result))
    if o.get("out"):
        print(f"wrote {len(result['records'])} samples of {result['metrics']['overall']['n']} questions to {o['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
