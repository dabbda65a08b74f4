"""train.py's tiny run (shared with the other train tests, so its compiled programs are cached), a
bad config, and the packed-sequence loss. Killed / stopped and resumed runs: test_soak.py."""

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
from r1jax.train.state import init_key

REPO = Path(__file__).resolve().parents[2]
RUN = ["configs/tiny-pretrain.yaml", "model.num_hidden_layers=2", "model.vocab_size=512", "data.vocab_size=512",
       "data.builtin_docs=400", "batch_size=8", "seq_len=32", "steps=8", "eval_every=0", "eval_batches=1",
       "optim.warmup_steps=2", "optim.decay_steps=6", "checkpoint.every=3", "checkpoint.keep=2"]


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
