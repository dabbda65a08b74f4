"""The train step learns, and its pieces do what the spec says."""

import chex
import jax
import numpy as np

from r1jax import config as config_lib
from r1jax.train.losses import mtp_targets, token_cross_entropy
from r1jax.train.step import TrainStep, synthetic_batch


def test_fifty_adamw_steps_halve_the_loss_on_a_fixed_batch():
    cfg = config_lib.load("configs/model/tiny-moe.yaml", "batch_size=4", "seq_len=32", "optim.learning_rate=3e-3")
    step = TrainStep(cfg)
    state = step.init(0)
    batch = synthetic_batch(cfg, jax.random.key(1))
    losses = []
    for _ in range(50):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    assert int(state.step) == 50


def test_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32)
    targets = rng.integers(0, 11, size=(2, 5))
    expected = np.log(np.exp(logits).sum(-1)) - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(token_cross_entropy(logits, targets), expected, rtol=1e-5)


def test_mtp_targets_stay_inside_documents():
    targets = np.array([[10, 11, 12, 13, 20, 21]])
    batch = {"targets": targets, "loss_mask": np.ones((1, 6), np.float32),
             "segment_ids": np.array([[1, 1, 1, 1, 2, 2]])}
    shifted, valid = mtp_targets(batch, 1)
    np.testing.assert_array_equal(np.asarray(shifted)[0, :5], [11, 12, 13, 20, 21])
    # Position 3 (segment 1) would predict a token of segment 2; the last position has no future.
    np.testing.assert_array_equal(np.asarray(valid)[0], [1, 1, 1, 0, 1, 0])


def test_gradient_accumulation_equals_one_big_batch():
    overrides = ("model.num_hidden_layers=2", "model.vocab_size=256", "batch_size=8", "seq_len=16")
    results = []
    for accum in (1, 4):
        cfg = config_lib.load("configs/model/tiny-moe.yaml", *overrides, f"grad_accum={accum}")
        step = TrainStep(cfg, keep_grads=True)
        state, metrics = step(step.init(0), synthetic_batch(cfg, jax.random.key(1)))
        results.append((metrics, state))
    (m1, s1), (m4, s4) = results
    np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-5)
    chex.assert_trees_all_close(m4["grads"], m1["grads"], rtol=1e-4, atol=1e-7)
    chex.assert_trees_all_close(s4.extra, s1.extra)  # loads summed over micro-batches
