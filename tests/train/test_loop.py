"""train.py end to end: a run killed with SIGKILL and resumed equals the straight run, bitwise."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from r1jax import config as config_lib
from r1jax.model.decoder import Decoder
from r1jax.train.losses import lm_loss, masked_mean, mtp_targets, token_cross_entropy
from r1jax.train.metrics import read_jsonl
from r1jax.train.state import init_key

REPO = Path(__file__).resolve().parents[2]
RUN = ["configs/tiny-pretrain.yaml", "model.num_hidden_layers=2", "model.vocab_size=512", "data.vocab_size=512",
       "data.builtin_docs=400", "batch_size=8", "seq_len=32", "steps=8", "eval_every=0", "eval_batches=1",
       "optim.warmup_steps=2", "optim.decay_steps=6", "checkpoint.every=3", "checkpoint.keep=2"]


def _train(run_dir, *extra, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "train.py", *RUN, f"run_dir={run_dir}", *extra], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def _losses(run_dir):
    by_step = {}
    for record in read_jsonl(Path(run_dir) / "metrics.jsonl"):
        if "loss" in record:
            by_step[record["step"]] = record["loss"]  # a resumed run re-logs steps: last one wins
    return by_step


def test_killed_and_resumed_run_equals_straight_run(tmp_path):
    straight = _train(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = _train(tmp_path / "killed", env_extra={"R1JAX_FAULT_KILL_AT_STEP": "5"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (tmp_path / "killed" / "checkpoints").exists()
    resumed = _train(tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step     3" in resumed.stdout, resumed.stdout

    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "killed")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert [a[s] for s in a] == [b[s] for s in a]  # bitwise: same data order, same RNG, same state

    from r1jax.checkpoint import load_params  # noqa: PLC0415
    from r1jax.train.step import TrainStep  # noqa: PLC0415

    abstract = TrainStep(config_lib.load(*RUN)).abstract
    params = [load_params(tmp_path / run / "params", (abstract.params, abstract.extra)) for run in ("straight", "killed")]
    for x, y in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


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
