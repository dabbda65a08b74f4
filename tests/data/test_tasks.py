"""Task generators, exact checkers and the train/eval split."""
import itertools
import re
from collections import Counter

import pytest

from r1jax.data.tasks import TASKS, Sample, check_record, arithmetic, corpus, countdown, linear

SEEDS = range(150)
DIFFICULTIES = (1, 2, 3)


def all_samples(task):
    return [TASKS[task].generate(seed, d) for seed in SEEDS for d in DIFFICULTIES]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_deterministic_by_seed(task):
    first = [TASKS[task].generate(seed, 2) for seed in range(20)]
    again = [TASKS[task].generate(seed, 2) for seed in range(20)]
    assert first == again
    assert len({s.question for s in first}) > 15


@pytest.mark.parametrize("task", sorted(TASKS))
def test_own_answer_passes_and_wrong_answer_fails(task):
    for s in all_samples(task):
        assert s.task == task
        assert TASKS[task].check(s.answer, s), s
        assert TASKS[task].check(f"<think>{s.reasoning}</think> <answer>{s.answer}</answer>", s), s
        wrong = f"{s.answer} + 1" if task == "countdown" else str(int(s.answer) + 1)
        assert not TASKS[task].check(wrong, s), s
        assert not TASKS[task].check(f"<answer>{wrong}</answer>", s), s
        assert not TASKS[task].check("", s)


def test_arithmetic_answer_is_python_arithmetic():
    for s in all_samples("arithmetic"):
        a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", s.question).groups()
        expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert int(s.answer) == expected
        assert s.reasoning.endswith(f"So {a} {op} {b} = {expected}.")


def test_addition_trace_writes_the_digits_with_carries():
    sample = arithmetic.generate(0, 3, op="+")
    a, b = map(int, re.findall(r"\d+", sample.question))
    written = re.findall(r"write (\d)", sample.reasoning)
    carries = [int(c) for c in re.findall(r"carry (\d)$", sample.reasoning, re.M)]
    # column k: a_k + b_k + carry_in = 10 * carry_out + written_k, as on paper
    digits_a, digits_b = str(a)[::-1], str(b)[::-1]
    carry = 0
    for k, (w, c) in enumerate(zip(written, carries)):
        x = int(digits_a[k]) if k < len(digits_a) else 0
        y = int(digits_b[k]) if k < len(digits_b) else 0
        assert x + y + carry == 10 * c + int(w)
        carry = c
    assert int(("1" if carry else "") + "".join(written)[::-1]) == a + b


def test_arithmetic_checker_parses_numbers():
    s = Sample("arithmetic", "What is 600 + 634?", "1234", "")
    assert arithmetic.check("1,234", s) and arithmetic.check(" 1234 ", s)
    assert not arithmetic.check("1234.5", s) and not arithmetic.check("about 1234", s)
    assert not arithmetic.check("<answer>12</answer> <answer>1234</answer> extra", Sample("a", "", "12", ""))


def test_linear_solution_satisfies_equation():
    for s in all_samples("linear"):
        a, sign, b, c = re.fullmatch(r"Solve for x: (-?\d+)\*x ([-+]) (\d+) = (-?\d+)\.", s.question).groups()
        a, b, c = int(a), int(b) * (1 if sign == "+" else -1), int(c)
        assert a * int(s.answer) + b == c
        assert linear.check(f"x = {s.answer}", s)


def test_countdown_instances_are_solvable_by_their_trace():
    for s in all_samples("countdown"):
        numbers, target = countdown.parse_instance(s)
        expression = s.reasoning.rsplit("Expression: ", 1)[1]
        assert countdown.check(expression, s)
        # independent of the checker: Python's own evaluation and a multiset count
        assert abs(eval(expression, {"__builtins__": {}}) - target) < 1e-9
        assert not Counter(int(n) for n in re.findall(r"\d+", expression)) - Counter(numbers)


COUNTDOWN = Sample(
    "countdown",
    "Using the numbers [2, 3, 5, 5], create an equation that equals 11. "
    "You may use +, -, * and /, and each number at most once.",
    "2 * 3 + 5",
    "",
)


@pytest.mark.parametrize(
    "answer, ok",
    [
        ("2 * 3 + 5", True),
        ("(5 + 5) / 2 + 3 * 2", False),  # 2 used twice
        ("5 + 5 + 3 - 2 + 0", False),  # 0 not given
        ("3 * 5 - 2 - 2", False),  # 2 used twice
        ("5 * 2 + 3 / 3", False),  # 3 used twice
        ("5 / (3 - 3) + 11", False),
        ("11", False),
        ("2 ** 3 + 3", False),
        ("-2 + 3 + 5 + 5", False),
        ("__import__('os').system('true')", False),
        ("2 * 3 + 5 = 11", True),
        ("2 * 3 + 5 = 12", False),
        ("(5 * 5 - 3) / 2", True),
        ("((", False),
    ],
)
def test_countdown_checker(answer, ok):
    assert countdown.check(answer, COUNTDOWN) is ok


def test_eval_split_never_overlaps_train():
    train = {s.question for s in itertools.islice(corpus.samples("train", seed=0), 3000)}
    train |= {r["messages"][0]["content"] for r in corpus.sft_records(1000, seed=1)}
    evaluation = corpus.eval_records(300, seed=0) + corpus.eval_records(300, seed=1)
    assert len({r["question"] for r in evaluation}) > 300
    assert not train & {r["question"] for r in evaluation}
    # the split is a property of the question text, not of how it was generated
    raw = [TASKS[t].generate(seed, d) for t in TASKS for seed in range(400) for d in DIFFICULTIES]
    share = sum(corpus.split_of(s.question) == "eval" for s in raw) / len(raw)
    assert 0.06 < share < 0.14


def test_corpus_records():
    docs = list(corpus.pretrain_documents(20, seed=3))
    assert docs == list(corpus.pretrain_documents(20, seed=3))
    assert all(doc.strip() for doc in docs)
    for record in corpus.sft_records(50, seed=0):
        user, assistant = record["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert re.fullmatch(r"<think>.+</think> <answer>.+</answer>", assistant["content"], re.S)
        assert check_record(assistant["content"], {**record, "question": user["content"]})
    for record in corpus.eval_records(50, seed=0):
        assert check_record(f"<answer>{record['answer']}</answer>", record)
        assert not check_record("<answer>nope</answer>", record)


def test_write_corpus(tmp_path):
    corpus.main(["--output", str(tmp_path), "--pretrain", "10", "--sft", "5", "--eval", "5"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.jsonl", "pretrain.jsonl", "pretrain.txt", "sft.jsonl"]
    assert len((tmp_path / "sft.jsonl").read_text().splitlines()) == 5
