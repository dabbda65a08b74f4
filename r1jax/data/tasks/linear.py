"""Linear equations a*x + b = c with an integer solution; the trace isolates x.

Difficulty d: |x| <= 5d, 1 <= |a| <= 3d + 2, |b| <= 10d.
"""
from __future__ import annotations

import random
import re

from r1jax.data.tasks import Sample, as_rng, final_answer_text
from r1jax.data.tasks.arithmetic import parse_integer

_X_EQUALS = re.compile(r"^x\s*=\s*")


def _equation(a: int, b: int, c: int) -> str:
    sign = "+" if b >= 0 else "-"
    return f"{a}*x {sign} {abs(b)} = {c}"


def generate(rng: random.Random | int, difficulty: int = 1) -> Sample:
    rng = as_rng(rng)
    x = rng.randint(-5 * difficulty, 5 * difficulty)
    a = rng.choice([-1, 1]) * rng.randint(1, 3 * difficulty + 2)
    b = rng.randint(-10 * difficulty, 10 * difficulty)
    c = a * x + b
    lines = [f"Start from {_equation(a, b, c)}."]
    if b > 0:
        lines.append(f"Subtract {b} from both sides: {a}*x = {c} - {b} = {c - b}.")
    elif b < 0:
        lines.append(f"Add {-b} to both sides: {a}*x = {c} + {-b} = {c - b}.")
    if a != 1:
        lines.append(f"Divide both sides by {a}: x = {c - b} / {a} = {x}.")
    x_text = f"({x})" if x < 0 else str(x)
    lines.append(f"Check: {a}*{x_text} {'+' if b >= 0 else '-'} {abs(b)} = {c}. So x = {x}.")
    return Sample(
        task="linear",
        question=f"Solve for x: {_equation(a, b, c)}.",
        answer=str(x),
        reasoning="\n".join(lines),
    )


def check(answer_text: str, sample: Sample) -> bool:
    """Accepts `5` or `x = 5` (exactly, nothing else)."""
    text = _X_EQUALS.sub("", final_answer_text(answer_text), count=1)
    return parse_integer(text) == int(sample.answer)
