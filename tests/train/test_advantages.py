"""Group advantages and DAPO helpers against NumPy transcriptions of TRL's formulas."""

import functools

import jax
import numpy as np
import pytest

from r1jax.train.advantages import (
    dynamic_sampling_filter,
    group_advantages,
    soft_overlong_penalty,
    zero_std_groups,
)

NUM_GROUPS, G = 4, 5
EPS = 1e-4


def _rollout():
    """[NUM_GROUPS * G] rewards laid out group by group; group 2 is all equal."""
    rng = np.random.default_rng(0)
    rewards = rng.integers(0, 3, (NUM_GROUPS, G)).astype(np.float32) * 0.5
    rewards[0] = [1.0, 0.0, 0.0, 1.0, 0.5]
    rewards[2] = 0.1
    return rewards.reshape(-1), np.repeat(np.arange(NUM_GROUPS), G)


def _numpy_advantages(rewards, scale_rewards):
    grouped = np.float64(rewards).reshape(NUM_GROUPS, G)
    centred = grouped - grouped.mean(1, keepdims=True)
    if scale_rewards == "group":
        centred = centred / (grouped.std(1, ddof=1, keepdims=True) + EPS)
    elif scale_rewards == "batch":
        centred = centred / (np.float64(rewards).std(ddof=1) + EPS)
    return centred.reshape(-1)


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_each_scaling_matches_numpy(scale_rewards):
    rewards, ids = _rollout()
    fn = jax.jit(functools.partial(
        group_advantages, num_groups=NUM_GROUPS, scale_rewards=scale_rewards, eps=EPS))
    got = np.asarray(fn(rewards, ids))
    np.testing.assert_allclose(got, _numpy_advantages(rewards, scale_rewards), rtol=1e-5, atol=1e-6)
    constant = got.reshape(NUM_GROUPS, G)[2]
    assert np.all(constant == 0.0) and not np.any(np.isnan(got))


def test_shuffled_order_gives_same_advantage_per_sample():
    rewards, ids = _rollout()
    perm = np.random.default_rng(1).permutation(len(rewards))
    plain = np.asarray(group_advantages(rewards, ids, num_groups=NUM_GROUPS))
    shuffled = np.asarray(group_advantages(rewards[perm], ids[perm], num_groups=NUM_GROUPS))
    np.testing.assert_allclose(shuffled, plain[perm], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_constant_groups_are_exactly_zero(scale_rewards):
    # Many random constants: for a good share, the float32 group mean is not the value itself.
    values = np.random.default_rng(2).uniform(0, 1, 64).astype(np.float32)
    rewards, ids = np.repeat(values, G), np.repeat(np.arange(64), G)
    got = group_advantages(rewards, ids, num_groups=64, scale_rewards=scale_rewards)
    np.testing.assert_array_equal(got, np.zeros_like(rewards))


def test_single_sample_groups_give_zero_not_nan():
    got = group_advantages(np.array([0.3, 1.0]), np.array([0, 1]), num_groups=2)
    np.testing.assert_array_equal(got, [0.0, 0.0])


def test_zero_std_groups():
    rewards, ids = _rollout()
    np.testing.assert_array_equal(
        zero_std_groups(rewards, ids, num_groups=NUM_GROUPS),
        np.ptp(rewards.reshape(NUM_GROUPS, G), axis=1) == 0)


def test_dynamic_sampling_keeps_only_varied_groups():
    rewards = np.array([1, 1, 0, 1, 0, 0, 1, 0, 0.5, 0.5])
    ids = np.array([7, 7, 3, 3, 9, 9, 3, 4, 4, 5])  # arbitrary ids, interleaved
    # group 7: all 1 (drop); 3: varied; 9: all 0 (drop); 4: varied; 5: single (drop)
    np.testing.assert_array_equal(dynamic_sampling_filter(rewards, ids), [2, 3, 6, 7, 8])
    np.testing.assert_array_equal(dynamic_sampling_filter(rewards, ids, max_groups=1), [2, 3, 6])


def test_soft_overlong_penalty_boundaries():
    max_len, cache = 20, 4  # safe up to 16 tokens
    lengths = np.array([0, 15, 16, 17, 18, 20, 21, 100])
    want = [0, 0, 0, -0.25, -0.5, -1.0, -1.0, -1.0]
    np.testing.assert_allclose(soft_overlong_penalty(lengths, max_len, cache), want, rtol=1e-6)
