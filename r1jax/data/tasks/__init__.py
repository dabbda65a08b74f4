"""Built-in verifiable reasoning tasks: offline, deterministic, exactly checkable.

Each task module has `generate(rng, difficulty) -> Sample` (rng: `random.Random` or an int
seed; difficulty >= 1) and `check(answer_text, sample) -> bool`. `answer_text` may be a
whole completion: the checker reads the last `<answer>...</answer>` if there is one.
"""
from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Mapping
from typing import Callable, NamedTuple


@dataclasses.dataclass(frozen=True)
class Sample:
    task: str
    question: str
    answer: str  # canonical final answer
    reasoning: str  # step-by-step trace ending in the answer


_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def final_answer_text(answer_text: str) -> str:
    """The content of the last `<answer>` tag, else the whole text, stripped."""
    tagged = _ANSWER.findall(answer_text)
    return (tagged[-1] if tagged else answer_text).strip()


def as_rng(rng: random.Random | int) -> random.Random:
    return rng if isinstance(rng, random.Random) else random.Random(rng)


class Task(NamedTuple):
    generate: Callable[[random.Random | int, int], Sample]
    check: Callable[[str, Sample], bool]


# Imported after `Sample` exists: the task modules import it from here.
from r1jax.data.tasks import arithmetic, countdown, linear  # noqa: E402

TASKS: dict[str, Task] = {
    "arithmetic": Task(arithmetic.generate, arithmetic.check),
    "countdown": Task(countdown.generate, countdown.check),
    "linear": Task(linear.generate, linear.check),
}


def check_record(answer_text: str, record: Mapping) -> bool:
    """`check` for a plain record with `task`, `question`, `answer` (eval or SFT rows)."""
    sample = Sample(record["task"], record["question"], record["answer"], reasoning="")
    return TASKS[record["task"]].check(answer_text, sample)
