"""pass@k, cons@k, pass@1 ± se and the paired comparison against NumPy / hand-computed values."""

import itertools
import math

import numpy as np
import pytest

from r1jax.eval import compare, pass_at_k
from r1jax.eval.metrics import majority, metrics, summarize


def brute_pass_at_k(n, c, k):
    """The probability that a random k-subset of n samples (c correct) holds a correct one, by enumeration."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 5, 5), (5, 2, 1), (5, 2, 3), (6, 1, 6), (8, 3, 4), (7, 4, 2)])
def test_pass_at_k_matches_enumeration(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_large_n_is_stable():
    assert pass_at_k(1000, 10, 100) == pytest.approx(1 - math.comb(990, 100) / math.comb(1000, 100), rel=1e-9)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 2)


def test_majority_vote():
    assert majority(["3", "4", "4", "3"]) == 0  # tie: the answer seen first
    assert majority(["3", "4", "4"]) == 1
    assert majority([None, None, "5"]) == 2  # None does not vote
    assert majority([None, None]) is None
    assert majority([" 7", "8", "7 "]) == 0  # ends' whitespace ignored


def recs(file, qid, correct, answers=None, lengths=None, finish=None, completions=None):
    k = len(correct)
    answers = answers or [None] * k
    return [{"file": file, "id": qid, "sample": j, "correct": bool(correct[j]), "answer": answers[j],
             "length": (lengths or [10] * k)[j], "finish_reason": (finish or ["stop"] * k)[j],
             "completion": (completions or ["x"] * k)[j]} for j in range(k)]


def test_summary_against_numpy():
    good = "<think>a</think> <answer>1</answer>"
    rows = (recs("f", "1", [1, 1, 1, 1], ["1"] * 4, completions=[good] * 4)  # all right
            + recs("f", "2", [0, 0, 0, 0], ["9", None, "8", "9"])  # all wrong
            + recs("f", "3", [0, 1, 0, 1], ["2", "3", "2", "3"], lengths=[1, 2, 3, 40],
                   finish=["stop", "stop", "length", "length"])  # tie: "2" first, wrong
            + recs("f", "4", [0, 1, 1, 0], [None, "5", "5", "6"])  # vote "5", right
            + recs("f", "5", [1, 0, 0, 0], ["7", None, None, None]))  # a lone vote, right
    rates = np.array([1, 0, 0.5, 0.5, 0.25])
    m = summarize(rows[::-1], k=4)  # order of the records does not matter
    assert m["n"] == 5
    assert m["pass@1"] == pytest.approx(rates.mean())
    assert m["pass@1_se"] == pytest.approx(rates.std(ddof=1) / np.sqrt(5))
    assert m["pass@4"] == pytest.approx(4 / 5)
    assert m["cons@4"] == pytest.approx(3 / 5)
    assert m["format"] == pytest.approx(4 / 20)
    lengths = [10] * 8 + [1, 2, 3, 40] + [10] * 8
    assert m["mean_length"] == pytest.approx(np.mean(lengths)) and m["max_length"] == 40
    assert m["truncated"] == pytest.approx(2 / 20)
    one = summarize(recs("g", "1", [1, 0]), k=2)
    assert one["pass@1_se"] == 0.0 and one["pass@2"] == 1.0 and one["cons@2"] == 0.0
    with pytest.raises(ValueError, match="samples"):
        summarize(rows, k=3)
    both = metrics(rows + recs("g", "1", [1, 0, 0, 0]), k=4)
    assert list(both) == ["f", "g", "overall"] and both["overall"]["n"] == 6
    assert both["overall"]["pass@1"] == pytest.approx((rates.sum() + 0.25) / 6)


def test_compare_is_paired():
    a = {"records": recs("f", "1", [0, 0]) + recs("f", "2", [1, 0]) + recs("f", "3", [1, 1]) + recs("g", "1", [0, 1])
         + recs("f", "only-a", [1, 1])}
    b = {"records": recs("f", "3", [1, 0]) + recs("f", "1", [1, 1]) + recs("f", "2", [1, 0]) + recs("g", "1", [1, 1])
         + recs("h", "1", [0, 0])}
    out = compare(a, b)
    diff_f = np.array([1.0, 0.0, -0.5])
    assert out["files"]["f"]["n"] == 3
    assert out["files"]["f"]["diff"] == pytest.approx(diff_f.mean())
    assert out["files"]["f"]["se"] == pytest.approx(diff_f.std(ddof=1) / np.sqrt(3))
    assert out["files"]["f"]["a"] == pytest.approx(0.5) and out["files"]["f"]["b"] == pytest.approx(2 / 3)
    diff = np.append(diff_f, 0.5)
    assert out["overall"]["n"] == 4 and out["overall"]["diff"] == pytest.approx(diff.mean())
    assert out["overall"]["se"] == pytest.approx(diff.std(ddof=1) / 2)
    assert out["files"]["g"]["se"] == 0.0 and out["unpaired"] == 2
