"""A GRPO run that dies after a checkpoint and is resumed equals the straight run, bitwise:
policy, optimizer, prompt iterator, rollout RNG and the KL reference all come back."""

import jax
import numpy as np
import pytest

from r1jax import config as config_lib
from r1jax.train.grpo import GrpoTrainer
from r1jax.train.metrics import read_jsonl

OVERRIDES = ("mode=grpo", "model.num_hidden_layers=2", "model.vocab_size=512", "data.vocab_size=512",
             "data.builtin_docs=200", "data.max_difficulty=1", "data.tasks=[arithmetic,countdown,linear]",
             "grpo.dynamic_sampling=false", "grpo.rewards={accuracy: 1.0, format: 0.2}", "seq_len=128",
             "grpo.num_generations=4", "grpo.prompts_per_step=2", "grpo.max_completion_length=12", "grpo.eval_prompts=0",
             "grpo.beta=0.04", "grpo.ref_reset_every=0", "grpo.mu=2", "grpo.num_minibatches=2",
             "optim.learning_rate=1e-2", "optim.eps=1e-6", "steps=3", "checkpoint.every=1", "checkpoint.keep=3",
             "init_from=null", "mesh.data=1")


class Crash(Exception):
    pass


def _trainer(run_dir, tokenizer_dir=None):
    extra = [f"data.tokenizer={tokenizer_dir / 'tokenizer.model'}"] if tokenizer_dir else []
    cfg = config_lib.load("configs/tiny-grpo.yaml", *OVERRIDES, f"run_dir={run_dir}", *extra)
    return GrpoTrainer(cfg, jax.devices()[:1])


def _step_losses(run_dir):
    return {r["step"]: (r["loss"], r["reward"]) for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}


def test_grpo_killed_after_a_checkpoint_and_resumed_equals_straight_run(tmp_path):
    straight = _trainer(tmp_path / "straight")
    final = jax.tree.map(np.asarray, straight.train()["state"].params)

    crashing = _trainer(tmp_path / "resumed", tmp_path / "straight")
    real_update = crashing.update

    def update_then_die(state, rollout, iteration):
        if iteration == 2:  # checkpoints of iterations 1 and 2 are on disk; the third update never lands
            raise Crash
        return real_update(state, rollout, iteration)

    crashing.update = update_then_die
    with pytest.raises(Crash):
        crashing.train()
    assert crashing.checkpointer.latest_step() == 2

    resumed = _trainer(tmp_path / "resumed", tmp_path / "straight")
    result = resumed.train()
    a, b = _step_losses(tmp_path / "straight"), _step_losses(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert a == b  # bitwise: same prompts, same sampled completions, same reference
    for x, y in zip(jax.tree.leaves(final), jax.tree.leaves(jax.tree.map(np.asarray, result["state"].params))):
        np.testing.assert_array_equal(x, y)
