"""The evaluation loop: seeds, chunks, the resumable sidecar, the result and its table.

    result = evaluate_with(generate_fn, questions, k=8, seed=0, batch_prompts=32, sidecar="out.partial.jsonl")
    result = evaluate(checkpoint="runs/demo/grpo", data=["gsm8k.jsonl", "builtin"], k=8, out="eval.json")

The result (also the `out=` JSON): {"metrics": {file: summary, "overall": summary} (see
`metrics`), "records": one per sample {"file", "id", "sample", "completion", "answer", "correct",
"finish_reason", "length"} in question then sample order, "config": what was asked}.

Determinism: question (file, id) samples from `question_seed(seed, file, id)` (and sample index
j), so a result depends on neither the batching nor the order; interrupting and resuming gives
the same records. Resumption: after every chunk of `batch_prompts` questions its records are
appended to the sidecar (`OUT.partial.jsonl`, a first line holding the config); a run with the
same config skips the questions found there complete, one with another config refuses to mix.
The `out=` JSON is written once, at the end, atomically, and the sidecar is then removed.
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

from tqdm import tqdm

from r1jax.eval import benchmarks
from r1jax.eval.backends import GenerateFn, Sample
from r1jax.eval.metrics import metrics as compute_metrics

DEFAULT_MAX_TOKENS = 512  # without a checkpoint config's grpo.max_completion_length


def question_seed(seed: int, file: str, qid: str) -> int:
    """The sampling seed of one question, from the run's seed and the question's (file, id)."""
    return (seed * 1_000_003 + zlib.crc32(f"{file}\n{qid}".encode())) % 2**31


def _as_sample(s) -> Sample:
    """A Sample, a str (finished, length unknown: 0) or anything with text / finish_reason / token_ids."""
    if isinstance(s, Sample):
        return s
    if isinstance(s, str):
        return Sample(s, "stop", 0)
    return Sample(s.text, s.finish_reason, len(s.token_ids))


def _read_sidecar(path: Path, config: Mapping, k: int) -> dict[tuple[str, str], list[dict]]:
    """Complete questions of a sidecar written with `config`: (file, id) -> its k records."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        return {}
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("config") != json.loads(json.dumps(config)):
        raise benchmarks.BenchmarkError(f"{path}: left by an evaluation with other arguments; delete it to start over")
    done: dict[tuple[str, str], list[dict]] = {}
    for line in lines[1:]:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            break  # the last line of a run killed mid-write
        done.setdefault((r["file"], r["id"]), []).append(r)
    return {key: rs for key, rs in done.items() if len(rs) == k}


def evaluate_with(generate_fn: GenerateFn, questions: Sequence[dict], *, k: int = 8, seed: int = 0,
                  batch_prompts: int = 32, sidecar: str | os.PathLike | None = None, config: Mapping | None = None,
                  progress: bool = True) -> dict:
    """Evaluates an already-loaded model: k samples of every question, scored and summarised.

    generate_fn(questions, k, seeds) -> k samples per question (`backends.GenerateFn`; a sample
    may be a `Sample`, a plain string, or an engine `Completion` with text): build it with
    `backends.engine_generate_fn(engine, tokenizer, ...)` over a model in memory, or
    `backends.endpoint_generate_fn(url, ...)`. questions: `benchmarks.load` records, passed
    through `benchmarks.render(questions, tokenizer)` for the engine (it reads "prompt").
    Called with up to `batch_prompts` questions at a time. config: stored in the result as is
    (and in the sidecar's header). Returns the result dict (module docstring)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    config = dict(config or {"k": k, "seed": seed})
    keys = [(q["file"], str(q["id"])) for q in questions]
    if len(set(keys)) != len(keys):
        raise benchmarks.BenchmarkError("two questions with the same (file, id)")
    sidecar = Path(sidecar) if sidecar is not None else None
    done = _read_sidecar(sidecar, config, k) if sidecar is not None and sidecar.exists() else {}
    todo = [q for q, key in zip(questions, keys) if key not in done]
    if sidecar is not None:
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        # Rewritten with only the complete questions: a half-written chunk is dropped, not duplicated.
        with open(sidecar, "w", encoding="utf-8") as f:
            f.write(json.dumps({"config": config}) + "\n")
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for key in keys if key in done for r in done[key])
    bar = tqdm(total=len(questions), initial=len(questions) - len(todo), desc="eval", unit="question",
               file=sys.stderr, disable=not progress)
    try:
        for start in range(0, len(todo), batch_prompts):
            chunk = todo[start: start + batch_prompts]
            seeds = [question_seed(seed, q["file"], str(q["id"])) for q in chunk]
            samples = generate_fn(chunk, k, seeds)
            if len(samples) != len(chunk) or any(len(s) != k for s in samples):
                raise ValueError(f"generate_fn must return {k} samples for each of {len(chunk)} questions")
            new = []
            for q, ss in zip(chunk, samples):
                recs = []
                for j, s in enumerate(map(_as_sample, ss)):
                    answer, correct = benchmarks.score(q, s.text)
                    recs.append({"file": q["file"], "id": str(q["id"]), "sample": j, "completion": s.text,
                                 "answer": answer, "correct": correct, "finish_reason": s.finish_reason,
                                 "length": int(s.length)})
                done[(q["file"], str(q["id"]))] = recs
                new += recs
            if sidecar is not None:
                with open(sidecar, "a", encoding="utf-8") as f:
                    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in new)
                    f.flush()
                    os.fsync(f.fileno())
            bar.update(len(chunk))
    finally:
        bar.close()
    records = [r for key in keys for r in done[key]]
    return {"metrics": compute_metrics(records, k), "records": records, "config": config}


def write_json(path: str | os.PathLike, obj) -> None:
    """Writes JSON atomically (a temporary file in the same directory, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sidecar_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name.removesuffix(".json") + ".partial.jsonl")


def evaluate(*, checkpoint: str | None = None, endpoint: str | None = None, data: Sequence[str], k: int = 8,
             out: str | os.PathLike | None = None, temperature: float = 0.6, top_p: float = 0.95,
             max_tokens: int | None = None, seed: int = 0, prompts: int = 64, overrides: Sequence[str] = (),
             **options) -> dict:
    """Evaluates a checkpoint (in process) or a server on benchmark files / the built-in tasks.

    checkpoint: an r1jax run dir, a params export or an HF model directory; endpoint: an
    OpenAI-compatible base URL (".../v1"); exactly one. data: JSONL paths and/or "builtin".
    max_tokens: default the checkpoint config's grpo.max_completion_length, else 512.
    options: format (gsm8k|math|aime), template ("...{question}..."), batch_prompts (32),
    tokenizer (a file or directory), config (a run config instead of the checkpoint's), slots,
    model and api_key (endpoint), progress (True: a tqdm bar on stderr). overrides: config
    `key=value`s. With `out`, the result is written there as JSON (resumably, see the module
    docstring). Bad input raises `BenchmarkError` before anything is written or loaded."""
    from r1jax import config as config_lib
    from r1jax.eval import backends

    known = {"format", "template", "batch_prompts", "tokenizer", "config", "slots", "model", "api_key", "progress"}
    if unknown := set(options) - known:
        raise TypeError(f"unknown options {sorted(unknown)} (known: {sorted(known)})")
    if (checkpoint is None) == (endpoint is None):
        raise ValueError("pass exactly one of checkpoint= and endpoint=")
    data = [data] if isinstance(data, str) else list(data)
    batch_prompts = options.get("batch_prompts", 32)
    tokenizer = cfg = None
    if checkpoint is not None:
        from r1jax.train.rejection import load_run

        cfg, tokenizer, _ = load_run(checkpoint, options.get("config"), overrides, options.get("tokenizer"))
        max_tokens = max_tokens or cfg.grpo.max_completion_length
    else:
        from r1jax.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(options["tokenizer"]) if options.get("tokenizer") else None
        if benchmarks.BUILTIN in data:
            cfg = config_lib.load(options["config"], *overrides) if options.get("config") else \
                config_lib.build(config_lib.Config, config_lib.load_dict(None, *overrides))
        max_tokens = max_tokens or DEFAULT_MAX_TOKENS
    questions = benchmarks.load(data, cfg=cfg, tokenizer=tokenizer, prompts=prompts, fmt=options.get("format"),
                                template=options.get("template"))
    config = {("checkpoint" if checkpoint is not None else "endpoint"): str(checkpoint or endpoint), "k": k,
              "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "seed": seed, "data": data,
              "prompts": prompts, "format": options.get("format"), "template": options.get("template")}
    if checkpoint is not None:
        questions = benchmarks.render(questions, tokenizer)
        engine = backends.make_engine(backends.load_weights(checkpoint, cfg), tokenizer, questions, k=k,
                                      max_tokens=max_tokens, batch_prompts=batch_prompts, slots=options.get("slots"))
        generate_fn = backends.engine_generate_fn(engine, tokenizer, temperature=temperature, top_p=top_p,
                                                  max_tokens=max_tokens)
    else:
        generate_fn = backends.endpoint_generate_fn(endpoint, model=options.get("model"), temperature=temperature,
                                                    top_p=top_p, max_tokens=max_tokens, tokenizer=tokenizer,
                                                    api_key=options.get("api_key"), concurrency=batch_prompts)
    sidecar = sidecar_path(out) if out is not None else None
    result = evaluate_with(generate_fn, questions, k=k, seed=seed, batch_prompts=batch_prompts, sidecar=sidecar,
                           config=config, progress=options.get("progress", True))
    if out is not None:
        write_json(out, result)
        sidecar.unlink(missing_ok=True)
    return result


# ----------------------------------------------------------------------------- tables


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def format_table(result: Mapping) -> str:
    """Per file and overall: n, pass@1 ± se, pass@k, cons@k, format, mean / max length, truncated
    (rates in percent)."""
    k = result["config"]["k"]
    head = (f"{'file':<24}{'n':>6}{'pass@1':>15}{f'pass@{k}':>9}{f'cons@{k}':>9}{'format':>8}{'len':>8}{'max':>7}"
            f"{'trunc':>7}")
    lines = [head]
    for name, m in result["metrics"].items():
        if not m.get("n"):
            continue
        pass1 = f"{_pct(m['pass@1'])} ± {_pct(m['pass@1_se'])}"
        lines.append(f"{name[:24]:<24}{m['n']:>6}{pass1:>15}{_pct(m[f'pass@{k}']):>9}{_pct(m[f'cons@{k}']):>9}"
                     f"{_pct(m['format']):>8}{m['mean_length']:>8.1f}{m['max_length']:>7}{_pct(m['truncated']):>7}")
    return "\n".join(lines)


def format_compare(cmp: Mapping, a_name: str = "A", b_name: str = "B") -> str:
    """The paired difference of `metrics.compare`, per file and overall (percent points)."""
    lines = [f"pass@1, paired by question: B - A (A = {a_name}, B = {b_name})",
             f"{'file':<24}{'n':>6}{'A':>8}{'B':>8}{'B - A':>18}"]
    for name, m in [*cmp["files"].items(), ("overall", cmp["overall"])]:
        if not m["n"]:
            lines.append(f"{name[:24]:<24}{0:>6}  (no shared questions)")
            continue
        diff = f"{100 * m['diff']:+.1f} ± {_pct(m['se'])}"
        lines.append(f"{name[:24]:<24}{m['n']:>6}{_pct(m['a']):>8}{_pct(m['b']):>8}{diff:>18}")
    if cmp["unpaired"]:
        lines.append(f"({cmp['unpaired']} questions in only one of the two are left out)")
    return "\n".join(lines)
