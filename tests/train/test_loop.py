"""train.py end to end: a run killed with SIGKILL and resumed equals the straight run, bitwise."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from r1jax import config as config_lib
from r1jax.checkpoint import _finished_steps
from r1jax.model.decoder import Decoder
from r1jax.train.losses import lm_loss, masked_mean, mtp_targets, token_cross_entropy
from r1jax.train.metrics import read_jsonl
from r1jax.train.state import init_key

REPO = Path(__file__).resolve().parents[2]
RUN = ["configs/tiny-pretrain.yaml", "model.num_hidden_layers=2", "model.vocab_size=512", "data.vocab_size=512",
       "data.builtin_docs=400", "batch_size=8", "seq_len=32", "steps=8", "eval_every=0", "eval_batches=1",
       "optim.warmup_steps=2", "optim.decay_steps=6", "checkpoint.every=3", "checkpoint.keep=2"]


def _train(run_dir, *extra):
    return subprocess.run([sys.executable, "train.py", *RUN, f"run_dir={run_dir}", *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def _logged_steps(metrics: Path) -> list[int]:
    """Steps with a loss in a metrics.jsonl being written (a line may be half there)."""
    steps = []
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record:
            steps.append(record["step"])
    return steps


def _train_and_kill(run_dir) -> int:
    """Starts train.py and SIGKILLs it from outside once a step after its newest finished
    checkpoint is logged (so the resumed run redoes steps, as after a real crash). Returns the
    newest finished checkpoint at the kill, read while the process is stopped."""
    metrics, checkpoints = Path(run_dir) / "metrics.jsonl", Path(run_dir) / "checkpoints"
    log = Path(f"{run_dir}.log")  # a file, not a pipe: a full pipe would stall the run
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "train.py", *RUN, f"run_dir={run_dir}"], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    try:
        while True:
            assert proc.poll() is None, f"train.py ended before the kill: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no step after a checkpoint was logged in time"
            finished = _finished_steps(checkpoints)
            logged = _logged_steps(metrics)
            if finished and logged and max(logged) > finished[-1]:
                proc.send_signal(signal.SIGSTOP)  # no save can finish while we look
                newest = _finished_steps(checkpoints)[-1]
                break
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -9
    return newest


def _losses(run_dir):
    by_step = {}
    for record in read_jsonl(Path(run_dir) / "metrics.jsonl"):
        if "loss" in record:
            by_step[record["step"]] = record["loss"]  # a resumed run re-logs steps: last one wins
    return by_step


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    done = _train(run_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def _same_run(a_dir, b_dir):
    """Per-step losses and final params equal, bitwise."""
    a, b = _losses(a_dir), _losses(b_dir)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert [a[s] for s in a] == [b[s] for s in a]  # bitwise: same data order, same RNG, same state

    from r1jax.checkpoint import load_params  # noqa: PLC0415
    from r1jax.train.step import TrainStep  # noqa: PLC0415

    abstract = TrainStep(config_lib.load(*RUN)).abstract
    params = [load_params(Path(run) / "params", (abstract.params, abstract.extra)) for run in (a_dir, b_dir)]
    for x, y in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sigterm_checkpoints_the_step_exits_0_and_resumes_bitwise(straight, tmp_path):
    """A preemption notice: the run stops after the step it arrived in, with that step saved."""
    run_dir = tmp_path / "preempted"
    log = Path(f"{run_dir}.log")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "train.py", *RUN, f"run_dir={run_dir}", "checkpoint.every=0"],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while not _logged_steps(run_dir / "metrics.jsonl"):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    stopped = _finished_steps(run_dir / "checkpoints")
    assert len(stopped) == 1 and 1 <= stopped[0] < 8, (stopped, log.read_text()[-3000:])  # every=0: only this one
    assert max(_logged_steps(run_dir / "metrics.jsonl")) == stopped[0]
    assert not (run_dir / "params").exists()  # an unfinished run exports nothing
    resumed = _train(run_dir, "checkpoint.every=0")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [int(s) for s in re.findall(r"resumed from step\s+(\d+)", resumed.stdout)] == stopped
    _same_run(straight, run_dir)


def test_killed_and_resumed_run_equals_straight_run(straight, tmp_path):
    newest = _train_and_kill(tmp_path / "killed")
    assert 3 <= newest < 8  # killed mid-run, after a checkpoint (every 3 steps)
    resumed = _train(tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [int(s) for s in re.findall(r"resumed from step\s+(\d+)", resumed.stdout)] == [newest], resumed.stdout
    _same_run(straight, tmp_path / "killed")


def test_bad_config_fails_at_start_naming_the_key():
    out = subprocess.run([sys.executable, "train.py", *RUN, "optim.learnig_rate=1"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "optim.learnig_rate" in out.stderr


def test_packed_loss_equals_token_weighted_documents():
    cfg = config_lib.load_model("configs/model/tiny-moe.yaml", "num_hidden_layers=2", "vocab_size=128")
    graphdef, state = jax.jit(lambda: nnx.split(Decoder(cfg, rngs=nnx.Rngs(params=init_key(0)))))()
    run = jax.jit(lambda b: nnx.merge(graphdef, state)(b["inputs"], b["positions"], b["segment_ids"],
                                                        mtp_inputs=b["targets"]))
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 128, size=n + 1) for n in (7, 5, 4)]  # 16 input tokens in all

    def alone(d, width=8):
        """One document in a row of `width`, right-padded: causal attention keeps the padding
        from changing the document's own outputs, and the mask drops it from the loss."""
        n = len(d) - 1
        pad = lambda x: np.pad(x, (0, width - n))  # noqa: E731
        return {"inputs": jnp.asarray(pad(d[:-1]))[None], "targets": jnp.asarray(pad(d[1:]))[None],
                "loss_mask": jnp.asarray(pad(np.ones(n, np.float32)))[None],
                "segment_ids": jnp.asarray(pad(np.ones(n, np.int32)))[None],
                "positions": jnp.asarray(pad(np.arange(n)))[None]}

    packed = {
        "inputs": jnp.asarray(np.concatenate([d[:-1] for d in docs]))[None],
        "targets": jnp.asarray(np.concatenate([d[1:] for d in docs]))[None],
        "loss_mask": jnp.ones((1, 16), jnp.float32),
        "segment_ids": jnp.asarray(np.repeat([1, 2, 3], [7, 5, 4]))[None],
        "positions": jnp.asarray(np.concatenate([np.arange(7), np.arange(5), np.arange(4)]))[None],
    }
    _, metrics = lm_loss(run(packed), packed, mtp_weight=0.3)

    ce_sum = ce_count = mtp_sum = mtp_count = 0.0
    for d in docs:
        b = alone(d)
        o = run(b)
        mask = b["loss_mask"]
        ce = token_cross_entropy(o.logits, b["targets"])
        ce_sum, ce_count = ce_sum + float((ce * mask).sum()), ce_count + float(mask.sum())
        targets, valid = mtp_targets(b, 1)
        mtp = token_cross_entropy(o.mtp_logits[0], targets)
        mtp_sum, mtp_count = mtp_sum + float((mtp * valid).sum()), mtp_count + float(valid.sum())
    np.testing.assert_allclose(float(metrics["ce"]), ce_sum / ce_count, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["mtp_ce"]), mtp_sum / mtp_count, rtol=1e-5)
    assert masked_mean(jnp.ones(3), jnp.zeros(3)) == 0.0
