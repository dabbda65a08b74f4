"""The train step learns, and its pieces do what the spec says."""

import chex
import jax
import jax.numpy as jnp
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


def test_nonfinite_loss_is_never_applied():
    cfg = config_lib.load("configs/model/tiny-moe.yaml", "model.num_hidden_layers=2", "model.vocab_size=256",
                          "batch_size=4", "seq_len=16")
    step = TrainStep(cfg)
    state = step.init(0)
    before = jax.tree.map(np.array, (state.params, state.extra, state.opt_state))
    batch = dict(synthetic_batch(cfg, jax.random.key(1)))
    batch["loss_mask"] = batch["loss_mask"].at[0, 3].set(np.nan)
    state, metrics = step(state, batch)
    assert float(metrics["nonfinite"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
    chex.assert_trees_all_equal(jax.tree.map(np.array, (state.params, state.extra, state.opt_state)), before)
    assert int(state.step) == 1
    state, metrics = step(state, synthetic_batch(cfg, jax.random.key(2)))
    assert float(metrics["nonfinite"]) == 0.0 and np.isfinite(float(metrics["loss"]))


def test_sft_prompt_tokens_get_exactly_zero_gradient():
    from r1jax.data.pipeline import tokenize_chat
    from r1jax.data.tokenizer import render_chat
    from r1jax.train.losses import masked_mean

    class CharTokenizer:  # an independent stand-in: one id per character, markers not special
        pad_id, eos_id = 0, 1

        def encode(self, text):
            return [2 + (ord(c) % 250) for c in text]

    record = {"messages": [{"role": "user", "content": "What is 2+2?"},
                           {"role": "assistant", "content": "<think>2+2=4</think> <answer>4</answer>"}]}
    example = tokenize_chat(record, CharTokenizer())
    mask = np.asarray(example["loss_mask"], np.float32)
    prompt = CharTokenizer().encode(render_chat(record["messages"][:1], add_generation_prompt=True))
    first = len(prompt) - 1  # the target index that predicts the first completion token
    assert mask[:first].sum() == 0 and mask[first:].min() == 1  # completion (+eos) only
    t, v = len(mask), 256
    logits = jax.random.normal(jax.random.key(0), (1, t, v))
    targets = jnp.asarray(example["targets"])[None]

    def loss(lg):
        return masked_mean(token_cross_entropy(lg, targets), jnp.asarray(mask)[None])

    grad = np.asarray(jax.grad(loss)(logits))[0]
    assert np.all(grad[mask == 0] == 0.0)  # exactly zero, not merely small
    assert np.all(np.abs(grad[mask == 1]).sum(-1) > 0)
