"""Multi-digit addition, subtraction and multiplication with column-wise traces.

Difficulty d: operands of up to d + 1 digits (the multiplier of multiplication: up to d).
"""
from __future__ import annotations

import random
import re

from r1jax.data.tasks import Sample, as_rng, final_answer_text

OPS = ("+", "-", "*")
_PLACES = ("ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands")
_INTEGER = re.compile(r"[+-]?\d+")


def _place(k: int) -> str:
    return _PLACES[k] if k < len(_PLACES) else f"10^{k}"


def _digits(n: int) -> list[int]:
    """Least significant first."""
    return [int(c) for c in reversed(str(n))]


def _add_trace(a: int, b: int) -> list[str]:
    xs, ys = _digits(a), _digits(b)
    lines, carry = [f"Add {a} + {b} column by column from the right."], 0
    for k in range(max(len(xs), len(ys))):
        x, y = (xs[k] if k < len(xs) else 0), (ys[k] if k < len(ys) else 0)
        total = x + y + carry
        lines.append(f"{_place(k)}: {x} + {y} + carry {carry} = {total}, write {total % 10}, carry {total // 10}")
        carry = total // 10
    if carry:
        lines.append(f"The final carry {carry} becomes the leading digit.")
    lines.append(f"So {a} + {b} = {a + b}.")
    return lines


def _sub_trace(a: int, b: int) -> list[str]:
    if a < b:
        return [f"{a} is smaller than {b}, so compute {b} - {a} and negate it."] + _sub_trace(b, a)[:-1] + [
            f"So {a} - {b} = {a - b}."
        ]
    xs, ys = _digits(a), _digits(b)
    lines, borrow = [f"Subtract {a} - {b} column by column from the right."], 0
    for k in range(len(xs)):
        x, y = xs[k], (ys[k] if k < len(ys) else 0)
        diff = x - y - borrow
        if diff < 0:
            lines.append(f"{_place(k)}: {x} - {y} - borrow {borrow} = {diff}, borrow ten: {diff + 10}, write {diff + 10}, borrow 1")
            diff, borrow = diff + 10, 1
        else:
            lines.append(f"{_place(k)}: {x} - {y} - borrow {borrow} = {diff}, write {diff}, borrow 0")
            borrow = 0
    lines.append(f"So {a} - {b} = {a - b}.")
    return lines


def _mul_trace(a: int, b: int) -> list[str]:
    lines, partials = [f"Multiply {a} * {b} digit by digit of {b}, from the right."], []
    for k, y in enumerate(_digits(b)):
        carry, row = 0, []
        for j, x in enumerate(_digits(a)):
            product = x * y + carry
            row.append(f"{x} * {y} + carry {carry} = {product}, write {product % 10}, carry {product // 10}")
            carry = product // 10
        partial = a * y * 10**k
        lines.append(f"{_place(k)} digit {y}: " + "; ".join(row) + f". Partial product {a * y}" + (f", shifted {k} places: {partial}." if k else "."))
        partials.append(partial)
    total = partials[0]
    for p in partials[1:]:
        lines.append(f"Add partial products: {total} + {p} = {total + p}")
        total += p
    lines.append(f"So {a} * {b} = {a * b}.")
    return lines


_TRACES = {"+": _add_trace, "-": _sub_trace, "*": _mul_trace}
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def generate(rng: random.Random | int, difficulty: int = 1, op: str | None = None) -> Sample:
    rng = as_rng(rng)
    op = op or rng.choice(OPS)
    digits_b = max(1, difficulty) if op == "*" else difficulty + 1
    a = rng.randrange(10 ** (difficulty + 1))
    b = rng.randrange(10**digits_b)
    return Sample(
        task="arithmetic",
        question=f"What is {a} {op} {b}?",
        answer=str(_APPLY[op](a, b)),
        reasoning="\n".join(_TRACES[op](a, b)),
    )


def parse_integer(text: str) -> int | None:
    text = text.replace(",", "").strip()
    return int(text) if _INTEGER.fullmatch(text) else None


def check(answer_text: str, sample: Sample) -> bool:
    return parse_integer(final_answer_text(answer_text)) == int(sample.answer)
