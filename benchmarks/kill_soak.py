"""Kill soak: train.py SIGKILLed at random moments, each kill followed by `resume=auto`, ends
bitwise equal to the straight run (per-step losses and final params).

    python benchmarks/kill_soak.py                    # 10 kills, seed 0, a 24-step run
    python benchmarks/kill_soak.py --kills 3 --seed 1 --work-dir /tmp/soak --keep

The tiny pretraining run (2 layers, 8 x 32 tokens a step, 8 emulated CPU devices) checkpoints
every 2 steps, asynchronously. It runs once straight, then again under fire. The kills take the
kinds below in turn (save, step, start, save, ...; shuffled after the first by a seeded RNG,
which also draws each moment):

    save   the first checkpoint save at or after step T to start (its Orbax tmp directory
           appears), then 0-30 ms: the kill lands while the save is written in the background
    step   step T logged, then 0-0.3 s: mid-step, mid-log
    start  a random moment before the first step: while importing, restoring, compiling
           (also what a kill becomes once no save is left before the end of the run)

T, kill i's step of N, is drawn from the i-th N-th of the run (at least one step past where the
launch resumed), so the kills spread over the whole run.

At its moment the process is SIGSTOPped, the checkpoint directory looked at (a tmp directory
still there = killed during a save), then SIGKILLed, and train.py launched again with the same
command (resume=auto). After the last kill the run goes to its end; its per-step losses (the
last one logged for each step: a resumed run logs steps again) and its exported params must
equal the straight run's bit for bit. Exit code 0 only then.

`soak()` is what tests/train/test_soak.py runs, in a 3-kill form. Each launch pays a JAX start
and a compile: the compile cache (JAX_COMPILATION_CACHE_DIR, by default <work dir>/jax-cache)
makes all but the first a cache read. On the 2-core development machine, shared and busy, the
default soak (10 kills: 7 during a save, 3 before the first step; 11 launches) took 2.4 min,
the straight run with its cold compile 42 s of it (up to ~5 min while the machine was busier);
the 3-kill test form 45-65 s.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TMP_MARK = ".orbax-checkpoint-tmp"  # Orbax writes step N into N.orbax-checkpoint-tmp, then renames it


def run_args(steps: int = 8, every: int = 2) -> list[str]:
    """train.py's arguments for the tiny run (no run_dir): the tests' tiny run (tests/train), so
    the compile cache they fill serves it. Neither `steps` nor `checkpoint.every` changes a
    compiled program (the schedule's length is decay_steps)."""
    return ["configs/tiny-pretrain.yaml", "model.num_hidden_layers=2", "model.vocab_size=512", "data.vocab_size=512",
            "data.builtin_docs=400", "batch_size=8", "seq_len=32", f"steps={steps}", "eval_every=0",
            "eval_batches=1", "optim.warmup_steps=2", "optim.decay_steps=6", f"checkpoint.every={every}",
            "checkpoint.keep=2", "resume=auto"]


def child_env(cache_dir: Path | None = None) -> dict[str, str]:
    """The environment of the train.py processes: the test suite's (tests/conftest.py) where set."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        flags += " --xla_force_host_platform_device_count=8"
    if "xla_backend_optimization_level" not in flags:
        flags += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env["XLA_FLAGS"] = flags.strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
    if cache_dir is not None:
        env.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache_dir))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env.setdefault("R1JAX_PEAK_FLOPS", "1e11")  # skip the GEMM peak measurement of every launch
    return env


def launch(args: list[str], run_dir: Path, log: Path, env: dict[str, str]) -> subprocess.Popen:
    """train.py in the background, its output into `log` (a file, not a pipe: a full pipe stalls it)."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "train.py", *args, f"run_dir={run_dir}"], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def run_train(args: list[str], run_dir: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args, f"run_dir={run_dir}"], cwd=REPO, env=env or child_env(),
                          capture_output=True, text=True, timeout=600)


# ----------------------------------------------------------------------------- reading a run


def logged_steps(metrics: Path, offset: int = 0) -> list[int]:
    """Steps with a loss in metrics.jsonl after byte `offset` (the file may be half written)."""
    if not metrics.exists():
        return []
    with open(metrics, "rb") as f:
        f.seek(offset)
        lines = f.read().decode(errors="replace").splitlines()
    steps = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record:
            steps.append(record["step"])
    return steps


def losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss; a resumed run logs steps again: the last one wins. Every line must parse."""
    by_step = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            by_step[record["step"]] = record["loss"]
    return by_step


def finished_steps(checkpoints: Path) -> list[int]:
    """Steps `resume=auto` can pick: r1jax's own rule (renamed, with Orbax's commit file)."""
    from r1jax.checkpoint import _finished_steps  # noqa: PLC0415  (as the tests do)

    return _finished_steps(checkpoints)


def saves_in_flight(checkpoints: Path) -> set[int]:
    """Steps with an Orbax tmp directory: saves in flight, or left by a killed one."""
    if not checkpoints.is_dir():
        return set()
    return {int(p.name.split(".")[0]) for p in checkpoints.iterdir() if TMP_MARK in p.name and p.name[0].isdigit()}


def differences(a_dir: Path, b_dir: Path, args: list[str]) -> list[str]:
    """What differs between two finished runs of `args`: per-step losses and exported params,
    bitwise. Empty when they are equal."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from r1jax import config as config_lib  # noqa: PLC0415
    from r1jax.checkpoint import load_params  # noqa: PLC0415
    from r1jax.train.step import TrainStep  # noqa: PLC0415

    problems = []
    a, b = losses(a_dir), losses(b_dir)
    steps = int(next(x for x in args if x.startswith("steps=")).split("=")[1])
    if sorted(a) != list(range(1, steps + 1)) or sorted(b) != sorted(a):
        problems.append(f"logged steps differ: {sorted(a)} vs {sorted(b)}")
    else:
        off = [s for s in a if a[s] != b[s]]  # bitwise: same data order, same RNG, same state
        if off:
            problems.append(f"losses differ at steps {off}: {[a[s] for s in off]} vs {[b[s] for s in off]}")
    cfg_args = [x for x in args if not x.startswith("resume=")]
    abstract = TrainStep(config_lib.load(*cfg_args)).abstract
    params = [load_params(Path(run) / "params", (abstract.params, abstract.extra)) for run in (a_dir, b_dir)]
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params[0])[0]]
    for name, x, y in zip(paths, jax.tree.leaves(params[0]), jax.tree.leaves(params[1])):
        if not np.array_equal(np.asarray(x), np.asarray(y)):
            problems.append(f"params differ: {name}")
    return problems


# ----------------------------------------------------------------------------- the soak


@dataclasses.dataclass
class Kill:
    kind: str  # save | step | start
    during_save: bool  # an Orbax tmp directory was there at the kill
    started_at: int  # the newest finished checkpoint at the launch, where resume=auto starts (0: none)
    last_logged: int | None  # the newest step this launch logged before the kill
    at_s: float  # seconds after the launch
    first_step_s: float | None  # the launch's time to its first step, if it got there


@dataclasses.dataclass
class SoakResult:
    kills: list[Kill]
    launches: int
    final_started_at: int | None  # the launch that finished the run
    wall_s: float
    straight_s: float
    problems: list[str]
    work_dir: str

    @property
    def equal(self) -> bool:
        return not self.problems and len(self.kills) > 0

    @property
    def during_save(self) -> int:
        return sum(k.during_save for k in self.kills)

    def summary(self) -> str:
        kinds = collections.Counter(k.kind for k in self.kills)
        starts = [k.started_at for k in self.kills] + [self.final_started_at]
        rows = [
            ("kills", f"{len(self.kills)} ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))})"),
            ("kills during a save", str(self.during_save)),
            ("launches", f"{self.launches}, starting at steps {starts} (0: no checkpoint yet)"),
            ("kill moments", " ".join(f"{k.kind}@{k.last_logged or '-'}{'*' if k.during_save else ''}"
                                      for k in self.kills) + "  (@ last step logged, * during a save)"),
            ("wall time", f"{self.wall_s:.0f} s (straight run {self.straight_s:.0f} s)"),
            ("bitwise equal", "yes" if self.equal else "no"),
        ]
        rows += [("  difference", p) for p in self.problems]
        return "\n".join(f"  {k:<22}{v}" for k, v in rows)


def _started_at(log: Path) -> int:
    """The step a finished launch resumed from (its log says so), 0 if it started afresh."""
    found = re.findall(r"resumed \S+ at step (\d+)", log.read_text(errors="replace"))
    return int(found[-1]) if found else 0


def _launch_and_kill(args: list[str], run_dir: Path, log: Path, env: dict[str, str], kind: str, target: int,
                     rng: random.Random, steps: int, start_window_s: float,
                     deadline: float) -> tuple[subprocess.Popen, Kill | None]:
    """Launches train.py, waits for this kill's moment (`save` and `step`: not before step
    `target`), then SIGSTOP, look, SIGKILL. The Kill is None if the run finished first."""
    metrics, checkpoints = run_dir / "metrics.jsonl", run_dir / "checkpoints"
    base = max(finished_steps(checkpoints), default=0)  # where resume=auto will restart
    if base == 0:
        metrics.unlink(missing_ok=True)  # as train.py does when it starts afresh, but before we read
    offset = metrics.stat().st_size if metrics.exists() else 0  # older launches' lines come before
    finished_before, leftovers = set(finished_steps(checkpoints)), saves_in_flight(checkpoints)
    t0 = time.monotonic()
    proc = launch(args, run_dir, log, env)
    if base >= steps - 1:  # at most the final step and save left: only the start is left to hit
        kind = "start"
    floor = min(max(target, base + 1), steps - 1)
    if kind == "save":
        delay = rng.uniform(0.0, 0.03)
    elif kind == "step":
        delay = rng.uniform(0.0, 0.3)
    else:
        at = rng.uniform(0.2, 1.0) * start_window_s
    new_saves: set[int] = set()  # steps this launch started saving
    first_step_s = None
    while True:
        if proc.poll() is not None:
            return proc, None
        new = logged_steps(metrics, offset)
        if new and first_step_s is None:
            first_step_s = time.monotonic() - t0
        if time.monotonic() > deadline:
            raise TimeoutError(f"the kill moment ({kind}) did not come: {log.read_text()[-2000:]}")
        # A killed save's tmp directory stays until this launch's Orbax removes it at start-up;
        # once it is gone, a tmp directory of the same step is a new save.
        in_flight = saves_in_flight(checkpoints)
        leftovers &= in_flight
        if kind == "save":
            new_saves |= (in_flight - leftovers) | (set(finished_steps(checkpoints)) - finished_before)
            if new_saves and max(new_saves) >= floor:
                time.sleep(delay)
                break
        elif kind == "step":
            if new and max(new) >= floor:
                time.sleep(delay)
                break
        elif time.monotonic() - t0 >= at or new:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGSTOP)  # nothing moves while we look
    during = bool(saves_in_flight(checkpoints) - leftovers)  # this launch's, not a killed save's leftovers
    new = logged_steps(metrics, offset)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc, Kill(kind, during, base, max(new) if new else None, time.monotonic() - t0, first_step_s)


def soak(kills: int = 10, seed: int = 0, work_dir: str | Path | None = None, *, steps: int = 24, every: int = 2,
         straight_dir: str | Path | None = None, timeout_s: float = 1200) -> SoakResult:
    """Runs the tiny run straight (or takes `straight_dir`, a finished run of the same
    `run_args(steps, every)`), then killed `kills` times (see the module docstring) and resumed
    to its end, and compares the two."""
    t_start = time.monotonic()
    work = Path(work_dir or tempfile.mkdtemp(prefix="kill_soak_")).absolute()
    work.mkdir(parents=True, exist_ok=True)
    env = child_env(work / "jax-cache")
    args = run_args(steps, every)
    rng = random.Random(seed)
    deadline = time.monotonic() + timeout_s

    straight_s = 0.0
    start_window_s = 8.0  # a launch's time to its first step: then as the latest launch measured it
    if straight_dir is None:
        straight_dir = work / "straight"
        shutil.rmtree(straight_dir, ignore_errors=True)
        log = work / "straight.log"
        proc = launch(args, straight_dir, log, env)
        if proc.wait(timeout=600) != 0:
            raise RuntimeError(f"the straight run failed: {log.read_text()[-3000:]}")
        straight_s = time.monotonic() - t_start
    straight_dir = Path(straight_dir)

    run_dir = work / "killed"
    shutil.rmtree(run_dir, ignore_errors=True)
    done: list[Kill] = []
    launches = 0
    final_started_at = None
    kinds = [("save", "step", "start")[i % 3] for i in range(kills)]
    kinds[1:] = rng.sample(kinds[1:], len(kinds) - 1)
    for i, kind in enumerate(kinds):
        launches += 1
        log = work / f"killed.{i}.log"
        target = int(rng.uniform(i, i + 1) * steps / kills)  # kill i in the i-th stretch of the run
        proc, kill = _launch_and_kill(args, run_dir, log, env, kind, target, rng, steps, start_window_s, deadline)
        if kill is None:  # the run ended before this kill's moment: the soak is over early
            if proc.returncode != 0:
                raise RuntimeError(f"train.py failed (launch {launches}): {log.read_text()[-3000:]}")
            final_started_at = _started_at(log)
            break
        done.append(kill)
        start_window_s = kill.first_step_s or start_window_s

    if not (run_dir / "params").exists():
        launches += 1
        log = work / "killed.final.log"
        proc = launch(args, run_dir, log, env)
        if proc.wait(timeout=max(60.0, deadline - time.monotonic())) != 0:
            raise RuntimeError(f"the resumed run failed: {log.read_text()[-3000:]}")
        final_started_at = _started_at(log)
    problems = differences(straight_dir, run_dir, args)
    return SoakResult(done, launches, final_started_at, time.monotonic() - t_start, straight_s, problems, str(work))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=24, help="about 2 a kill: each kill moves the run on by ~1-2")
    p.add_argument("--every", type=int, default=2, help="checkpoint.every")
    p.add_argument("--work-dir", default=None, help="default: a fresh temporary directory")
    p.add_argument("--keep", action="store_true", help="keep the work directory (runs, logs)")
    a = p.parse_args(argv)
    result = soak(a.kills, a.seed, a.work_dir, steps=a.steps, every=a.every)
    print(f"kill soak, seed {a.seed}, {a.steps} steps, checkpoint every {a.every}")
    print(result.summary())
    if a.keep or a.work_dir or not result.equal:
        print(f"  {'work dir':<22}{result.work_dir}")
    else:
        shutil.rmtree(result.work_dir, ignore_errors=True)
    return 0 if result.equal and len(result.kills) == a.kills else 1


if __name__ == "__main__":
    sys.exit(main())
