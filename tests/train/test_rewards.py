"""Rule-based rewards and the reward runner."""

import logging
import time

import numpy as np
import pytest

from r1jax.train import rewards as R

GOOD = "<think>2+2 is 4</think><answer>4</answer>"


@pytest.mark.parametrize(
    "completion, want",
    [
        (GOOD, 1.0),
        ("  <think>\nstep\n</think>\n\n<answer> 4 </answer>\n", 1.0),
        ("<think></think><answer>4</answer>", 1.0),
        ("<answer>4</answer>", 0.0),  # no reasoning
        ("<think>a</think>", 0.0),  # no answer
        ("<think>a</think><answer>4</answer> and more", 0.0),  # trailing text
        ("Sure! <think>a</think><answer>4</answer>", 0.0),  # leading text
        ("<think>a</think>so<answer>4</answer>", 0.0),  # text between blocks
        ("<answer>4</answer><think>a</think>", 0.0),  # wrong order
        ("<think>a</think><answer>4</answer><answer>5</answer>", 0.0),  # two answers
        ("<think>a</think><think>b</think><answer>4</answer>", 0.0),  # two thinks
        ("<think>a<answer>3</answer></think><answer>4</answer>", 0.0),  # answer hidden in think
        ("<think>a<think>b</think></think><answer>4</answer>", 0.0),  # nested
        ("<think>a</think><answer>4</answer></answer>", 0.0),
    ],
)
def test_format_reward_table(completion, want):
    assert R.format_reward(["q"], [completion]) == [want]


def test_format_reward_when_prompt_opens_think():
    completions = ["2+2 is 4</think><answer>4</answer>", GOOD]
    assert R.format_reward(["q <think>"] * 2, completions) == [1.0, 0.0]
    assert R.format_reward(["q"] * 2, completions, think_in_prompt=True) == [1.0, 0.0]
    assert R.format_reward(["q <think>"] * 2, completions, think_in_prompt=False) == [0.0, 1.0]


def test_accuracy_reward_math():
    completions = [
        "<think>half</think> so \\boxed{1/2}",
        "<think>..</think><answer>42</answer>",
        "<think>..</think><answer>The result is \\boxed{\\frac{1}{2}}</answer>",
        "<think>..</think><answer>41</answer>",
        "no final answer 0.5",
        "\\boxed{3} then \\boxed{x^2+1}",
    ]
    answers = ["0.5", "42", "0.5", "42", "0.5", "1 + x^2"]
    got = R.accuracy_reward(["q"] * 6, completions, answer=answers)
    assert got == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]


def test_accuracy_reward_uses_registered_task_checker(monkeypatch):
    monkeypatch.setattr(R, "CHECKERS", {})
    R.register_checker("reverse", lambda text, sample: text == sample["word"][::-1])
    completions = ["<answer>olleh</answer>", "<answer>hello</answer>", "<answer>4</answer>", "x"]
    got = R.accuracy_reward(
        ["q"] * 4, completions,
        task=["reverse", "reverse", "math", "math"],
        word=["hello", "hello", None, None],
        answer=[None, None, "4.0", None],
    )
    assert got == [1.0, 0.0, 1.0, None]


def test_language_consistency():
    completions = [
        "<think>we add two and two</think><answer>4</answer>",
        "<think>we 加 two 和 two</think><answer>4</answer>",  # 3 of 5 words English
        "<think>x = 2^{10}, 1024</think><answer>1024</answer>",  # only the word "x"
        "<think>  </think><answer>4</answer>",
    ]
    got = R.language_consistency_reward(["q"] * 4, completions)
    np.testing.assert_allclose(got, [1.0, 0.6, 1.0, 0.0])
    zh = R.language_consistency_reward(["q"], [completions[1]], language=["zh"])
    np.testing.assert_allclose(zh, [0.4])


def constant_reward(prompts, completions, **_):
    """Loaded by import path in the tests below."""
    return [0.25] * len(completions)


def test_load_reward_fn_by_path_and_name():
    assert R.load_reward_fn("tests.train.test_rewards:constant_reward")(["q"], ["c"]) == [0.25]
    assert R.load_reward_fn("format") is R.format_reward
    with pytest.raises(ValueError):
        R.load_reward_fn("no_colon_here")


def test_runner_survives_raising_and_hanging_rewards(caplog):
    def broken_reward(prompts, completions, **_):
        raise RuntimeError("boom")

    def slow_reward(prompts, completions, **_):
        time.sleep(3.0)
        return [5.0] * len(completions)

    def partial_reward(prompts, completions, **_):
        return [1.0, None]

    runner = R.RewardRunner(
        [(broken_reward, 1.0), (slow_reward, 1.0), (constant_reward, 2.0), (partial_reward, 1.0)],
        timeout_s=0.5,
    )
    start = time.monotonic()
    with caplog.at_level(logging.ERROR, logger=R.__name__):
        result = runner(["q", "q"], ["a", "b"])
    assert time.monotonic() - start < 2.0
    np.testing.assert_allclose(result.total, [1.5, 0.5])
    np.testing.assert_array_equal(result.per_function["broken_reward"], [0.0, 0.0])
    np.testing.assert_array_equal(result.per_function["slow_reward"], [0.0, 0.0])
    np.testing.assert_array_equal(result.per_function["partial_reward"], [1.0, np.nan])
    assert result.failed == ["broken_reward", "slow_reward"]
    assert "broken_reward" in caplog.text and "boom" in caplog.text
    assert "slow_reward" in caplog.text


def test_runner_from_config_calls_math_verify_off_the_main_thread():
    runner = R.RewardRunner.from_config({"accuracy": 1.0, "format": 0.5}, timeout_s=30)
    result = runner(["q"], ["<think>t</think><answer>\\frac{1}{2}</answer>"], answer=["0.5"])
    assert result.failed == []
    np.testing.assert_allclose(result.total, [1.5])
