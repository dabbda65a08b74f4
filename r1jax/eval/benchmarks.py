"""Benchmark files -> question records, and the check of an answer.

A question record: `{"file", "id", "question", "answer", "content", "task"?}`. file: the data
file's name (so a copy elsewhere pairs with it in `compare`), id: the record's `id` /
`unique_id` field, else its line number (1-based), as a string; answer: the reference; content:
the user message sent (the question in the prompt template); task: a built-in task's name.
`render` adds "prompt" (the chat-template text the model continues).

Formats, detected from a file's first record unless `format=` forces one:

    gsm8k   JSONL {"question", "answer": "... #### 72"}: the final answer after "#### ", commas dropped
    math    JSONL {"problem", "answer"?, "solution"?}: answer, else the last \\boxed{} of the solution
            (MATH, MATH-500)
    aime    JSONL {"problem", "answer"} (AIME-style; the answer may be a number)
    builtin the held-out split of the built-in tasks (`data=builtin`): the config's data.tasks /
            max_difficulty, `grpo.prompt_records(cfg, tokenizer, "eval", prompts)`; ids 0, 1, ...

Prompts: a built-in question is sent as is (how the models are trained on it); the others get
DeepSeek's advice appended (`MATH_TEMPLATE`); `template=` with `{question}` overrides both.

Bad input (a missing or empty file, malformed JSON, a record without a question or answer, an
unknown format) raises `BenchmarkError` with one line naming the file and line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from r1jax.data.tasks import check_record
from r1jax.data.tokenizer import chat_text
from r1jax.train.rewards import extract_answer, math_answers_match

BUILTIN = "builtin"
FORMATS = ("gsm8k", "math", "aime")
MATH_TEMPLATE = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."


class BenchmarkError(ValueError):
    """Bad benchmark input; the message is one line naming the file (and line)."""


def detect_format(first: Mapping, where: str) -> str:
    if "question" in first and "answer" in first:
        return "gsm8k"
    if "problem" in first and "solution" in first:
        return "math"
    if "problem" in first and "answer" in first:
        return "aime"
    raise BenchmarkError(f"{where}: cannot tell the format from the keys {sorted(first)} (want question+answer, "
                         f"problem+solution or problem+answer; or pass format={'|'.join(FORMATS)})")


def _answer(record: Mapping, fmt: str, where: str) -> tuple[str, str]:
    """(question, reference answer) of one record."""
    key = "question" if fmt == "gsm8k" else "problem"
    if not isinstance(record.get(key), str):
        raise BenchmarkError(f"{where}: no {key!r} (format {fmt})")
    answer = record.get("answer")
    if fmt == "gsm8k":
        if not isinstance(answer, str) or "####" not in answer:
            raise BenchmarkError(f"{where}: no 'answer' with a final '#### ANSWER' (format gsm8k)")
        answer = answer.rsplit("####", 1)[1].strip().replace(",", "")
    elif fmt == "math" and answer is None and isinstance(record.get("solution"), str):
        answer = extract_answer(record["solution"])  # its last \\boxed{} (no <answer> tags in MATH)
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        alternative = " or a \\boxed{} in 'solution'" if fmt == "math" else ""
        raise BenchmarkError(f"{where}: no answer ('answer'{alternative}, format {fmt})")
    return record[key], answer.strip()


def read_file(path: str | Path, fmt: str | None = None, template: str | None = None) -> list[dict]:
    """Question records of one JSONL benchmark file (see the module docstring)."""
    path = Path(path)
    if fmt is not None and fmt not in FORMATS:
        raise BenchmarkError(f"format={fmt}: unknown (known: {', '.join(FORMATS)})")
    if not path.is_file():
        raise BenchmarkError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise BenchmarkError(f"{path}:{n}: malformed JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(record, dict):
                raise BenchmarkError(f"{path}:{n}: a JSON object per line expected, got {type(record).__name__}")
            rows.append((n, record))
    if not rows:
        raise BenchmarkError(f"{path}: empty (no records)")
    fmt = fmt or detect_format(rows[0][1], f"{path}:{rows[0][0]}")
    template = template or MATH_TEMPLATE
    out, seen = [], set()
    for n, record in rows:
        question, answer = _answer(record, fmt, f"{path}:{n}")
        qid = str(record.get("id", record.get("unique_id", n)))
        if qid in seen:
            raise BenchmarkError(f"{path}:{n}: id {qid!r} appears twice")
        seen.add(qid)
        out.append({"file": path.name, "id": qid, "question": question, "answer": answer,
                    "content": template.format(question=question)})
    return out


def builtin(cfg, tokenizer, count: int, template: str | None = None) -> list[dict]:
    """`count` held-out built-in task questions of a run config (its data.tasks, max_difficulty)."""
    from r1jax.train.grpo import prompt_records

    out = []
    for i, r in enumerate(prompt_records(cfg, tokenizer, "eval", count)):
        q = {"file": BUILTIN, "id": str(i), "question": r["question"], "answer": r["answer"], "task": r["task"],
             "content": template.format(question=r["question"]) if template else r["question"]}
        if not template:
            q["prompt"], q["prompt_ids"] = r["prompt"], r["prompt_ids"]
        out.append(q)
    return out


def load(data: Sequence[str], *, cfg=None, tokenizer=None, prompts: int = 64, fmt: str | None = None,
         template: str | None = None) -> list[dict]:
    """Question records of every entry of `data` (JSONL paths, or "builtin"), in order. All files
    are read before anything runs, so bad input fails first."""
    if template is not None and "{question}" not in template:
        raise BenchmarkError(f"template={template!r}: must contain {{question}}")
    out, names = [], {}
    for entry in data:
        if entry == BUILTIN:
            if cfg is None or tokenizer is None:
                raise BenchmarkError("data=builtin needs a run config and a tokenizer (checkpoint=, or tokenizer=FILE "
                                     "with endpoint=)")
            got = builtin(cfg, tokenizer, prompts, template)
        else:
            got = read_file(entry, fmt, template)
        name = got[0]["file"] if got else entry
        if name in names:
            raise BenchmarkError(f"{entry}: a second data file named {name} (after {names[name]}); results are keyed "
                                 "by file name")
        names[name] = entry
        out += got
    if not out:
        raise BenchmarkError("no questions (data= is empty)")
    return out


def render(questions: Sequence[dict], tokenizer) -> list[dict]:
    """Adds "prompt" (the chat-template text of the user message) where it is missing."""
    def prompt(q):
        return chat_text(tokenizer, [{"role": "user", "content": q["content"]}], add_generation_prompt=True)

    return [q if "prompt" in q else {**q, "prompt": prompt(q)} for q in questions]


def score(question: Mapping, completion: str) -> tuple[str | None, bool]:
    """(extracted answer or None, correct). Built-in tasks: the task's checker on the completion;
    others: math-verify equality of the extracted answer (`rewards.extract_answer`: the last
    <answer> block, else the last \\boxed{}) with the reference."""
    answer = extract_answer(completion)
    if "task" in question:
        return answer, bool(check_record(completion, question))
    return answer, answer is not None and bool(math_answers_match(question["answer"], answer))
