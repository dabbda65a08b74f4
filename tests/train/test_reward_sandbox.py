"""Rewards in worker processes: a hang, a crash, a runaway allocation, an exception or a NaN
scores 0 with its counter, the other functions still count, and a batch waits at most its deadline."""

import functools
import json
import logging
import os
import time

import numpy as np
import pytest

from r1jax.train import rewards as R
from r1jax.train.reward_sandbox import RewardSandbox, import_path
from tests.train import reward_fixtures as F

PROMPTS = ["q"] * 4
COMPLETIONS = ["a", "bb", "ccc", "dddd"]
LENGTHS = np.array([1.0, 2.0, 3.0, 4.0])
TIMEOUT_S = 1.5
MARGIN_S = 3.0  # a loose bound on a loaded 2-core machine, not a benchmark


@pytest.fixture(scope="module")
def sandbox():
    with RewardSandbox(workers=2, memory_mb=512, preload=[F.length]) as box:
        box.start()
        yield box


def _run(fns, sandbox, timeout_s=TIMEOUT_S):
    return R.compute_rewards(fns, PROMPTS, COMPLETIONS, {"answer": ["1"] * 4}, timeout_s=timeout_s, sandbox=sandbox)


@pytest.mark.parametrize("bad, counter", [
    (F.sleeping, "timeouts"),
    (F.segfault, "errors"),
    (F.exiting, "errors"),
    (F.memory_hungry, "errors"),
    (F.raising, "errors"),
])
def test_a_failing_reward_scores_zero_and_is_counted_the_other_still_counts(sandbox, bad, counter):
    start = time.monotonic()
    result = _run([(F.length, 1.0), (bad, 1.0)], sandbox)
    assert time.monotonic() - start < TIMEOUT_S + MARGIN_S
    np.testing.assert_array_equal(result.per_function["length"], LENGTHS)
    np.testing.assert_array_equal(result.per_function[bad.__name__], np.zeros(4))
    np.testing.assert_array_equal(result.total, LENGTHS)
    assert result.failed == [bad.__name__]
    assert (result.errors, result.timeouts) == ((4, 0) if counter == "errors" else (0, 4))
    after = _run([(F.length, 1.0)], sandbox, timeout_s=30)  # the pool still works
    assert after.failed == [] and after.errors == after.timeouts == 0
    np.testing.assert_array_equal(after.total, LENGTHS)


@pytest.mark.parametrize("sandboxed", [True, False])
def test_nan_and_inf_score_zero_per_sample_none_stays_nan(sandbox, sandboxed):
    result = _run([(F.length, 1.0), (F.nan_first, 1.0), (F.none_first, 2.0)], sandbox if sandboxed else None)
    np.testing.assert_array_equal(result.per_function["nan_first"], [0.0, 0.0, 1.0, 1.0])
    np.testing.assert_array_equal(result.per_function["none_first"], [np.nan, 0.5, 0.5, 0.5])
    np.testing.assert_array_equal(result.total, LENGTHS + [0.0, 1.0, 2.0, 2.0])
    assert result.failed == [] and (result.errors, result.timeouts) == (2, 0)


def test_hung_calls_beyond_the_worker_count_all_end_at_one_deadline(sandbox):
    hung = [(functools.partial(F.sleeping), 0.0) for _ in range(3)]  # 3 hangs on 2 workers
    start = time.monotonic()
    result = _run([(F.length, 1.0), *hung], sandbox)
    assert TIMEOUT_S <= time.monotonic() - start < TIMEOUT_S + MARGIN_S
    np.testing.assert_array_equal(result.total, LENGTHS)
    assert result.timeouts == 12 and len(result.failed) == 3


def test_reward_runs_in_a_worker_by_import_path_or_pickled():
    assert import_path(F.length) == "tests.train.reward_fixtures:length"
    assert import_path(lambda p, c: c) is None
    with RewardSandbox(workers=1, memory_mb=512) as box:
        for fn in (F.worker_pid, functools.partial(F.worker_pid)):
            pids = R.compute_rewards([(fn, 1.0)], PROMPTS, COMPLETIONS, timeout_s=30, sandbox=box).total
            assert len(set(pids)) == 1 and pids[0] != os.getpid()


def test_unpicklable_reward_runs_in_a_thread_with_a_warning(sandbox, caplog):
    def local_length(prompts, completions, **_):
        return [float(len(c)) for c in completions]

    with caplog.at_level(logging.WARNING):
        result = _run([(local_length, 1.0)], sandbox)
    np.testing.assert_array_equal(result.total, LENGTHS)
    assert "local_length" in caplog.text and "thread" in caplog.text


def test_a_pool_broken_between_batches_is_replaced(sandbox, caplog):
    for pid in {_run([(F.worker_pid, 1.0)], sandbox).total[0] for _ in range(4)}:
        os.kill(int(pid), 9)  # an idle worker dies: pebble marks the whole pool broken
    time.sleep(0.5)  # pebble looks every 0.1 s
    with caplog.at_level(logging.WARNING):
        result = _run([(F.length, 1.0)], sandbox, timeout_s=30)
    assert "starting a new one" in caplog.text
    np.testing.assert_array_equal(result.total, LENGTHS)
    assert result.failed == []


def test_grpo_iteration_with_a_hanging_reward_takes_at_most_the_timeout_longer(tmp_path, monkeypatch):
    from r1jax.sampling.engine import Completion
    from tests.train.test_grpo import _trainer

    timeout = 2.0
    trainer = _trainer(tmp_path, "mesh.data=1", "grpo.eval_prompts=0", "steps=1", "checkpoint.every=0",
                       f"grpo.reward_timeout_s={timeout}",
                       "grpo.rewards={accuracy: 1.0, format: 0.2, tests.train.reward_fixtures:sleeping: 0.0}")
    g = trainer.cfg.grpo.num_generations
    monkeypatch.setattr(trainer, "_sample", lambda state, prompts, seed: [
        [Completion([11, 12, 13 + j], [], "stop") for j in range(g)] for _ in prompts])
    with_hang = trainer.reward_fns
    trainer.reward_fns = with_hang[:2]
    trainer.rollout(None, 0)  # starts the workers
    baseline = trainer.rollout(None, 0).seconds
    trainer.reward_fns = with_hang
    trainer.train()
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    print(f"rollout {baseline:.2f}s without the hang, {record['rollout_s']:.2f}s with it (timeout {timeout}s)")
    assert record["reward/timeouts"] == trainer.rows and record["reward/errors"] == 0
    assert timeout <= record["rollout_s"] < baseline + timeout + MARGIN_S
