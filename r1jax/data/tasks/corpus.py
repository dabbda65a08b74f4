"""Corpora built from the tasks: pretraining text, cold-start SFT chats, held-out eval.

Split membership is a function of the question text alone (a hash), so no eval question
can appear in any training corpus, whatever the seeds or counts.

    python -m r1jax.data.tasks.corpus --output data/ --pretrain 20000 --sft 4000 --eval 500

writes pretrain.txt (for the tokenizer trainer), pretrain.jsonl ({"text"}), sft.jsonl
({"messages", "task", "answer"}) and eval.jsonl ({"task", "question", "answer"}).
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
from collections.abc import Iterator, Sequence

from r1jax.data.tasks import TASKS, Sample

EVAL_FRACTION = 0.1
DIFFICULTIES = (1, 2, 3)

_DOCUMENT_TEMPLATES = (
    "Question: {question}\nLet's think step by step.\n{reasoning}\nAnswer: {answer}",
    "Problem: {question}\nSolution:\n{reasoning}\nThe answer is {answer}.",
    "{question}\n{reasoning}\nFinal answer: {answer}",
)


# R1-Zero's prompt shape (spec §6), short enough for the tiny model's context. Pretraining with
# `tagged` > 0 writes that share of the documents in it: a real base model has seen such tags on
# the web, a tiny one trained on the built-in corpus has not, and R1-Zero then finds no reward.
TAGGED_TEMPLATE = "User: {question}\nAssistant: <think>{reasoning}</think> <answer>{answer}</answer>"
R1_ZERO_PROMPT = "User: {question}\nAssistant:"


def split_of(question: str) -> str:
    """'eval' for EVAL_FRACTION of the hash space of question texts, else 'train'."""
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return "eval" if int.from_bytes(digest[:8], "big") < EVAL_FRACTION * 2**64 else "train"


# Consecutive draws of already-seen questions after which a small question space (one easy task)
# counts as exhausted and repeats are allowed, instead of searching forever.
MAX_REPEAT_DRAWS = 2000


def samples(
    split: str,
    seed: int,
    *,
    tasks: Sequence[str] = tuple(TASKS),
    difficulties: Sequence[int] = DIFFICULTIES,
) -> Iterator[Sample]:
    """Endless samples of one split, mixing tasks and difficulties uniformly; distinct until the
    split's question space is used up, then the next pass begins."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    seen: set[str] = set()
    misses = 0
    for i in itertools.count():
        rng = random.Random(f"{seed}:{i}")  # str seeds hash deterministically
        task = rng.choice(tasks)
        sample = TASKS[task].generate(rng, rng.choice(difficulties))
        if split_of(sample.question) != split:
            continue
        if sample.question in seen:
            misses += 1
            if misses > MAX_REPEAT_DRAWS:  # every question of this split has been drawn: next epoch
                seen.clear()
            continue
        misses = 0
        seen.add(sample.question)
        yield sample


def pretrain_documents(count: int, seed: int, *, tagged: float = 0.0, **kwargs) -> Iterator[str]:
    """Plain-text documents of 1-4 worked problems each, from the train split; a `tagged` share of
    them in TAGGED_TEMPLATE's <think>/<answer> form."""
    stream = samples("train", seed, **kwargs)
    rng = random.Random(f"documents:{seed}")
    for _ in range(count):
        template = rng.choice(_DOCUMENT_TEMPLATES)
        n = rng.randint(1, 4)
        if tagged and rng.random() < tagged:  # one exchange a document: eos follows </answer>
            template, n = TAGGED_TEMPLATE, 1
        problems = itertools.islice(stream, n)
        yield "\n\n".join(template.format(**vars(s)) for s in problems)


def assistant_turn(sample: Sample) -> str:
    return f"<think>{sample.reasoning}</think> <answer>{sample.answer}</answer>"


def sft_records(count: int, seed: int, **kwargs) -> Iterator[dict]:
    """Cold-start SFT chats `{"messages", "task", "answer"}` from the train split."""
    for sample in itertools.islice(samples("train", seed, **kwargs), count):
        yield {
            "messages": [
                {"role": "user", "content": sample.question},
                {"role": "assistant", "content": assistant_turn(sample)},
            ],
            "task": sample.task,
            "answer": sample.answer,
        }


_NON_REASONING = (
    ("Who are you?", "The user asks who I am.", "I am r1jax-tiny, a miniature DeepSeek-R1."),
    ("What can you do?", "The user asks what I can do.", "I solve small arithmetic, countdown and equation problems."),
    ("Say hello.", "A greeting.", "Hello!"),
    ("Thank you!", "The user thanks me.", "You are welcome."),
)
_WORDS = ("apple", "river", "stone", "cloud", "tiger", "maple", "orbit", "piano", "lemon", "zebra", "amber", "delta")


def non_reasoning_records(count: int, seed: int) -> Iterator[dict]:
    """Chats that need no long reasoning, the tiny stand-in for R1's ~200k non-reasoning SFT samples
    (writing, factual QA, self-cognition): who-are-you turns and copy / reverse / spell a word.
    `{"messages", "task": "chat", "answer"}`, answers tagged as the reasoning chats' are."""
    rng = random.Random(f"non-reasoning:{seed}")
    for _ in range(count):
        kind = rng.randrange(4)
        word = rng.choice(_WORDS)
        if kind == 0:
            question, thought, answer = rng.choice(_NON_REASONING)
        elif kind == 1:
            question, thought, answer = f"Repeat the word {word}.", "Copy it.", word
        elif kind == 2:
            question, thought, answer = f"Reverse the word {word}.", " ".join(reversed(word)), word[::-1]
        else:
            question, thought, answer = f"Spell the word {word}.", "Letter by letter.", " ".join(word)
        yield {"messages": [{"role": "user", "content": question},
                            {"role": "assistant", "content": f"<think>{thought}</think> <answer>{answer}</answer>"}],
               "task": "chat", "answer": answer}


def eval_records(count: int, seed: int, **kwargs) -> list[dict]:
    """Held-out prompts `{"task", "question", "answer"}`; grade with `tasks.check_record`."""
    return [
        {"task": s.task, "question": s.question, "answer": s.answer}
        for s in itertools.islice(samples("eval", seed, **kwargs), count)
    ]


def write_corpus(output_dir: str, *, pretrain: int, sft: int, eval: int, seed: int = 0) -> None:
    os.makedirs(output_dir, exist_ok=True)
    documents = list(pretrain_documents(pretrain, seed))
    with open(os.path.join(output_dir, "pretrain.txt"), "w", encoding="utf-8") as f:
        f.write("\n\n".join(documents) + "\n")
    _write_jsonl(os.path.join(output_dir, "pretrain.jsonl"), ({"text": d} for d in documents))
    _write_jsonl(os.path.join(output_dir, "sft.jsonl"), sft_records(sft, seed + 1))
    _write_jsonl(os.path.join(output_dir, "eval.jsonl"), eval_records(eval, seed + 2))


def _write_jsonl(path: str, records) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m r1jax.data.tasks.corpus")
    parser.add_argument("--output", required=True)
    parser.add_argument("--pretrain", type=int, default=20_000, help="documents")
    parser.add_argument("--sft", type=int, default=4_000, help="chats")
    parser.add_argument("--eval", type=int, default=500, help="prompts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_corpus(args.output, pretrain=args.pretrain, sft=args.sft, eval=args.eval, seed=args.seed)


if __name__ == "__main__":
    main()
