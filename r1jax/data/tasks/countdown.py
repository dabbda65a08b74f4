"""Countdown: reach a target from given numbers with + - * /, each number at most once.

The generator builds a solution first (a left-deep chain of exact integer steps over a
subset of the numbers) and sets the target to its value, so every instance is solvable;
the trace walks through that solution. Difficulty d: d + 2 numbers.
"""
from __future__ import annotations

import ast
import random
from collections import Counter
from fractions import Fraction

from r1jax.data.tasks import Sample, as_rng, final_answer_text

MAX_TARGET = 1000


def _combine(value: int, expr: str, x: int, rng: random.Random) -> tuple[int, str, str]:
    """One exact integer step value ∘ x; returns (new value, new expression, trace line)."""
    options = [
        (value + x, f"({expr} + {x})", f"{value} + {x} = {value + x}"),
        (value * x, f"({expr} * {x})", f"{value} * {x} = {value * x}"),
    ]
    if value > x:
        options.append((value - x, f"({expr} - {x})", f"{value} - {x} = {value - x}"))
    if x > value:
        options.append((x - value, f"({x} - {expr})", f"{x} - {value} = {x - value}"))
    if x > 1 and value % x == 0:
        options.append((value // x, f"({expr} / {x})", f"{value} / {x} = {value // x}"))
    if value > 1 and x % value == 0:
        options.append((x // value, f"({x} / {expr})", f"{x} / {value} = {x // value}"))
    return rng.choice(options)


def generate(rng: random.Random | int, difficulty: int = 1) -> Sample:
    rng = as_rng(rng)
    count = difficulty + 2
    high = 25 if difficulty <= 2 else 100
    while True:
        numbers = [rng.randint(1, high) for _ in range(count)]
        used = rng.sample(numbers, rng.randint(max(2, count - 1), count))
        value, expr = used[0], str(used[0])
        steps = []
        for x in used[1:]:
            value, expr, step = _combine(value, expr, x, rng)
            steps.append(step)
        if 1 <= value <= MAX_TARGET and value not in numbers:
            break
    solution = expr[1:-1]  # drop the outermost parentheses
    reasoning = "\n".join(
        [f"Combine the numbers one at a time, starting from {used[0]}."]
        + steps
        + [f"That reaches the target {value}, using {', '.join(map(str, used))}.", f"Expression: {solution}"]
    )
    return Sample(
        task="countdown",
        question=(
            f"Using the numbers {numbers}, create an equation that equals {value}. "
            "You may use +, -, * and /, and each number at most once."
        ),
        answer=solution,
        reasoning=reasoning,
    )


def parse_instance(sample: Sample) -> tuple[list[int], int]:
    """(numbers, target) back from the question text."""
    numbers_text = sample.question[sample.question.index("[") + 1 : sample.question.index("]")]
    target_text = sample.question.split("equals ", 1)[1].split(".", 1)[0]
    return [int(n) for n in numbers_text.split(",")], int(target_text)


def evaluate(expression: str) -> tuple[Fraction, list[int]]:
    """Exact value of an arithmetic expression and the numbers it uses.

    Only integer literals and binary + - * / are allowed; anything else (names, calls,
    powers, unary minus) raises ValueError, as does division by zero.
    """
    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Add):
                return left + right
            if isinstance(node.op, ast.Sub):
                return left - right
            if isinstance(node.op, ast.Mult):
                return left * right
            if right == 0:
                raise ValueError("division by zero")
            return left / right
        raise ValueError(f"not allowed in a countdown expression: {ast.dump(node)[:60]}")

    used: list[int] = []
    try:
        tree = ast.parse(expression.replace("×", "*").replace("÷", "/"), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an expression: {expression!r}") from e
    return walk(tree.body), used


def check(answer_text: str, sample: Sample) -> bool:
    numbers, target = parse_instance(sample)
    expression, _, claimed = final_answer_text(answer_text).partition("=")
    if claimed.strip() and claimed.strip() != str(target):
        return False
    try:
        value, used = evaluate(expression)
    except ValueError:
        return False
    return value == target and not Counter(used) - Counter(numbers)
