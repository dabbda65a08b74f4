"""The GRPO loop's pieces: sharded update equals one device, beta 0 keeps no reference,
dynamic sampling keeps only informative groups. Rollouts are scripted (no engine) to stay fast."""

import dataclasses

import chex
import jax
import numpy as np
import pytest

from r1jax import config as config_lib
from r1jax.sampling.engine import Completion
from r1jax.train.grpo import GrpoTrainer

OVERRIDES = ("mode=grpo", "model.num_hidden_layers=2", "model.vocab_size=512", "data.vocab_size=512",
             "data.builtin_docs=200", "data.max_difficulty=1", "data.tasks=[arithmetic,countdown,linear]",
             "grpo.dynamic_sampling=false", "grpo.rewards={accuracy: 1.0, format: 0.2}", "seq_len=128",
             "grpo.num_generations=4", "grpo.prompts_per_step=4", "grpo.max_completion_length=16", "grpo.eval_prompts=4", "grpo.num_minibatches=1", "optim.eps=1e-6")


def _trainer(tmp_path, *extra):
    cfg = config_lib.load("configs/tiny-grpo.yaml", *OVERRIDES, f"run_dir={tmp_path}", "init_from=null", *extra)
    n = cfg.mesh.data * cfg.mesh.expert * cfg.mesh.model
    return GrpoTrainer(cfg, jax.devices()[:n])


def _scripted_groups(trainer, rewards_by_group):
    """Groups of G scripted completions whose total rewards are given (the rest as _score makes them)."""
    rng = np.random.default_rng(0)
    g = trainer.cfg.grpo.num_generations
    groups = []
    for rewards in rewards_by_group:
        prompt = next(trainer.prompts)
        completions = [Completion([int(t) for t in rng.integers(10, 500, size=rng.integers(3, 16))], [], "stop")
                       for _ in range(g)]
        groups.append((prompt, completions, [""] * g, np.asarray(rewards, np.float32), {}, np.full(g, 8)))
    return groups


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    trainer = _trainer(tmp_path_factory.mktemp("single"), "mesh.data=1")
    state = trainer.step_fn.init(0)
    rollout = trainer._assemble(_scripted_groups(trainer, [[0, 1, 0, 1], [1, 1, 0, 0], [0.2, 0, 0, 1], [1, 0, 0, 0]]),
                                0, 0.0)
    host_state = jax.tree.map(np.array, state)
    new_state, metrics = trainer.update(state, rollout, 0)
    return trainer, host_state, rollout, jax.tree.map(np.array, new_state), metrics


def test_grpo_update_on_mesh_222_equals_single_device(single, tmp_path):
    single_trainer, host_state, rollout, expected, metrics = single
    trainer = _trainer(tmp_path, "mesh.data=2", "mesh.expert=2", "mesh.model=2")
    state, got = trainer.update(trainer.step_fn.place(host_state), rollout, 0)
    for key in ("loss", "policy_loss", "entropy", "grad_norm"):
        np.testing.assert_allclose(got[key], metrics[key], rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(jax.tree.map(np.asarray, state.params), expected.params, rtol=1e-5, atol=1e-6)


def test_beta_zero_holds_no_reference_and_compiles_no_reference_pass(single):
    trainer = single[0]
    assert trainer.cfg.grpo.beta == 0 and trainer.reference is None
    trainer._maybe_reset_reference(None, 0)
    assert trainer.reference is None
    assert not hasattr(trainer.step_fn, "_logprobs")  # no old-policy or reference forward compiled


def test_rollout_padded_to_a_length_bucket_updates_as_if_padded_to_seq_len(single):
    trainer, host_state, rollout, expected, _ = single
    longest = max(len(p["prompt_ids"]) + n - 1 for p, n in zip(rollout.prompts, rollout.lengths))
    t = rollout.batch["inputs"].shape[1]
    assert t % 16 == 0 and longest <= t < longest + 16 and t < trainer.cfg.seq_len
    pad = trainer.cfg.seq_len - t
    full = dataclasses.replace(rollout, batch={k: np.pad(v, ((0, 0), (0, pad)), mode="edge" if k == "advantages" else "constant")
                                               for k, v in rollout.batch.items()})
    state, _ = trainer.update(trainer.step_fn.place(host_state), full, 0)
    chex.assert_trees_all_close(jax.tree.map(np.asarray, state.params), expected.params, rtol=1e-5, atol=1e-6)


def test_advantages_are_per_group_and_zero_for_equal_rewards(single):
    rollout = single[2]
    adv = rollout.batch["advantages"][:, 0].reshape(4, 4)
    np.testing.assert_allclose(adv.sum(1), 0.0, atol=1e-5)
    # the mask covers exactly the completion tokens: targets from the last prompt token on
    np.testing.assert_array_equal(rollout.batch["completion_mask"].sum(1), rollout.lengths)
    first = np.argmax(rollout.batch["completion_mask"], axis=1)
    prompt_lengths = np.array([len(p["prompt_ids"]) for p in rollout.prompts])
    np.testing.assert_array_equal(first, prompt_lengths - 1)


def test_dynamic_sampling_never_yields_a_zero_variance_group(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, "mesh.data=1", "grpo.dynamic_sampling=true")
    g = trainer.cfg.grpo.num_generations
    calls = iter(range(1000))

    def fake_sample(state, prompts, seed):
        return [[Completion([11, 12, 13], [], "stop") for _ in range(g)] for _ in prompts]

    def fake_score(prompts, completions):
        n = len(prompts) * g
        # every other group has all-equal rewards
        total = np.concatenate([np.ones(g) if next(calls) % 2 else np.arange(g, dtype=float) for _ in prompts])
        return [""] * n, total, {}, np.full(n, 3)

    monkeypatch.setattr(trainer, "_sample", fake_sample)
    monkeypatch.setattr(trainer, "_score", fake_score)
    rollout = trainer.rollout(None, 0)
    groups = rollout.rewards.reshape(-1, g)
    assert len(groups) == trainer.cfg.grpo.prompts_per_step
    assert all(np.ptp(r) > 0 for r in groups)


def test_first_minibatch_at_mu_one_takes_its_old_logprobs_from_its_own_forward(single, tmp_path):
    """mu 1, two minibatches: update() skips the old-policy forward of the first minibatch; the
    result equals two steps on minibatches whose old log-probs were all computed up front."""
    _, host_state, rollout, _, _ = single
    trainer = _trainer(tmp_path, "mesh.data=1", "grpo.num_minibatches=2")
    got, _ = trainer.update(trainer.step_fn.place(host_state), rollout, 3)
    state = trainer.step_fn.place(host_state)
    minibatches = [trainer.step_fn.place_batch(mb) for mb in trainer._minibatches(rollout.batch, trainer.cfg.seed + 3)]
    minibatches = [dict(mb, old_logp=trainer.step_fn.logprobs(state.params, state.extra, mb)) for mb in minibatches]
    for mb in minibatches:
        state, _ = trainer.step_fn(state, mb)
    assert not np.allclose(jax.tree.leaves(state.params)[0], jax.tree.leaves(host_state.params)[0])
    chex.assert_trees_all_close(jax.tree.map(np.asarray, got.params), jax.tree.map(np.asarray, state.params),
                                rtol=1e-5, atol=1e-6)


def test_no_signal_stops_redraws_then_the_run_with_a_clear_message(tmp_path, monkeypatch):
    """All-alike groups: one sampling round an iteration (not max_sampling_rounds), the signal
    share reported, and NoSignalError after grpo.max_iterations_without_signal iterations."""
    from r1jax.train.grpo import NoSignalError

    trainer = _trainer(tmp_path, "mesh.data=1", "grpo.dynamic_sampling=true", "grpo.max_sampling_rounds=4",
                       "grpo.max_iterations_without_signal=2", "grpo.eval_prompts=0", "steps=10")
    g = trainer.cfg.grpo.num_generations
    rounds = []

    def fake_sample(state, prompts, seed):
        rounds.append(len(prompts))
        return [[Completion([11, 12, 13], [], "stop") for _ in range(g)] for _ in prompts]

    def fake_score(prompts, completions):
        n = len(prompts) * g
        return [""] * n, np.zeros(n), {}, np.full(n, 3)

    monkeypatch.setattr(trainer, "_sample", fake_sample)
    monkeypatch.setattr(trainer, "_score", fake_score)
    with pytest.raises(NoSignalError, match="2 GRPO iterations in a row without reward signal"):
        trainer.train()
    assert len(rounds) == 2  # one round per iteration, two iterations
    assert trainer.last_signal.informative == 0 and trainer.last_signal.groups == rounds[-1]


def test_sigterm_stops_grpo_after_the_iteration_with_a_checkpoint(tmp_path, monkeypatch):
    import os
    import signal

    from r1jax.checkpoint import _finished_steps

    trainer = _trainer(tmp_path, "mesh.data=1", "grpo.eval_prompts=0", "steps=6", "checkpoint.every=0")
    g = trainer.cfg.grpo
    calls = []

    def fake_sample(state, prompts, seed):
        calls.append(seed)
        if len(calls) == 2:  # the notice arrives during iteration 2
            os.kill(os.getpid(), signal.SIGTERM)
        return [[Completion([11, 12, 13 + j], [], "stop") for j in range(g.num_generations)] for _ in prompts]

    def fake_score(prompts, completions):
        n = len(prompts) * g.num_generations
        return [""] * n, np.tile(np.arange(g.num_generations, dtype=float), len(prompts)), {}, np.full(n, 3)

    monkeypatch.setattr(trainer, "_sample", fake_sample)
    monkeypatch.setattr(trainer, "_score", fake_score)
    before = signal.getsignal(signal.SIGTERM)
    result = trainer.train()
    assert result["stopped_at"] == 2 and len(calls) == 2
    assert _finished_steps(tmp_path / "checkpoints") == [2]
    assert not (tmp_path / "params").exists()
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is the caller's again
