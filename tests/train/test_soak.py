"""train.py killed (SIGKILL) or stopped (SIGTERM), then resumed with `resume: auto`: the per-step
losses and final params equal the straight run's, bitwise.

The kill soak is benchmarks/kill_soak.py (10 SIGKILLs at random moments, some while an
asynchronous save is being written); this suite runs its 3-kill form through the same `soak()`.
"""

import importlib.util
import re
import signal
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load_kill_soak():
    spec = importlib.util.spec_from_file_location("kill_soak", REPO / "benchmarks" / "kill_soak.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


kill_soak = _load_kill_soak()
RUN = kill_soak.run_args(steps=8, every=2)  # tests/train/test_loop.py's tiny run: the same compiled programs


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    done = kill_soak.run_train(RUN, run_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_three_kills_at_random_moments_resume_to_the_straight_run_bitwise(straight, tmp_path):
    result = kill_soak.soak(kills=3, seed=0, work_dir=tmp_path, steps=8, straight_dir=straight)
    summary = result.summary()
    assert len(result.kills) == 3, summary
    assert result.during_save >= 1, summary  # the first kill waits for a save to start
    assert result.equal, summary


def test_sigterm_checkpoints_the_step_exits_0_and_resumes_bitwise(straight, tmp_path):
    """A preemption notice: the run stops after the step it arrived in, with that step saved."""
    run_dir = tmp_path / "preempted"
    log = Path(f"{run_dir}.log")
    no_periodic = [*RUN, "checkpoint.every=0"]
    proc = kill_soak.launch(no_periodic, run_dir, log, kill_soak.child_env())
    deadline = time.monotonic() + 600
    while not kill_soak.logged_steps(run_dir / "metrics.jsonl"):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    stopped = kill_soak.finished_steps(run_dir / "checkpoints")
    assert len(stopped) == 1 and 1 <= stopped[0] < 8, (stopped, log.read_text()[-3000:])  # every=0: only this one
    assert max(kill_soak.logged_steps(run_dir / "metrics.jsonl")) == stopped[0]
    assert not (run_dir / "params").exists()  # an unfinished run exports nothing
    resumed = kill_soak.run_train(no_periodic, run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [int(s) for s in re.findall(r"resumed from step\s+(\d+)", resumed.stdout)] == stopped
    assert kill_soak.differences(straight, run_dir, RUN) == []
