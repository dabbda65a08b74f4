"""Group-relative advantages (GRPO) and DAPO's rollout-shaping helpers.

Shapes: N completions (B prompts x G samples each, in any order). Group membership comes from
explicit group ids in [0, num_groups), so a batch that was shuffled or sharded still pairs
every completion with its own group; the per-group statistics are segment reductions, which
jit with a static `num_groups`.
"""

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

ScaleRewards = Literal["group", "batch", "none"]


def _num_groups(group_ids, num_groups: int | None) -> int:
    # Deriving it needs concrete ids; under jit pass num_groups.
    return int(np.max(np.asarray(group_ids))) + 1 if num_groups is None else num_groups


def zero_std_groups(
    rewards: jax.Array, group_ids: jax.Array, *, num_groups: int | None = None
) -> jax.Array:
    """[N] rewards, [N] int group ids -> [num_groups] bool: True where all rewards are equal.

    Exact equality (max == min), so such a group's advantages are exactly zero. Feeds the
    `frac_reward_zero_std` metric and DAPO dynamic sampling. Empty groups report False.
    """
    num_groups = _num_groups(group_ids, num_groups)
    rewards = jnp.asarray(rewards, jnp.float32)
    group_max = jax.ops.segment_max(rewards, group_ids, num_segments=num_groups)
    group_min = jax.ops.segment_min(rewards, group_ids, num_segments=num_groups)
    return group_max == group_min


def _unbiased_std(sum_sq_dev: jax.Array, count: jax.Array) -> jax.Array:
    # ddof=1 like torch .std(); a single sample has no spread, so 0 instead of NaN.
    return jnp.sqrt(sum_sq_dev / jnp.maximum(count - 1.0, 1.0))


def group_advantages(
    rewards: jax.Array,
    group_ids: jax.Array,
    *,
    num_groups: int | None = None,
    scale_rewards: ScaleRewards = "group",
    eps: float = 1e-4,
) -> jax.Array:
    """[N] rewards, [N] int group ids -> [N] f32 advantages.

    A = R - mean(R of its group), then, by `scale_rewards` (TRL's option):
      "group": / (std of its group + eps)
      "batch": / (std of all N rewards + eps)
      "none":  unscaled (Dr. GRPO)
    Standard deviations are unbiased (ddof=1), matching TRL, which uses torch `.std()`; a
    group or batch of one sample gets std 0. A group whose rewards are all equal gets exactly
    0 (no rounding residue from the mean, no NaN). `num_groups` must be static under jit.
    """
    num_groups = _num_groups(group_ids, num_groups)
    rewards = jnp.asarray(rewards, jnp.float32)
    group_sum = jax.ops.segment_sum(rewards, group_ids, num_segments=num_groups)
    group_count = jax.ops.segment_sum(jnp.ones_like(rewards), group_ids, num_segments=num_groups)
    group_mean = group_sum / jnp.maximum(group_count, 1.0)
    centred = rewards - group_mean[group_ids]

    if scale_rewards == "group":
        sum_sq_dev = jax.ops.segment_sum(centred**2, group_ids, num_segments=num_groups)
        std = _unbiased_std(sum_sq_dev, group_count)[group_ids]
    elif scale_rewards == "batch":
        batch_centred = rewards - rewards.mean()
        std = _unbiased_std((batch_centred**2).sum(), jnp.float32(rewards.shape[0]))
    elif scale_rewards == "none":
        std = None
    else:
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    advantages = centred if std is None else centred / (std + eps)

    constant = zero_std_groups(rewards, group_ids, num_groups=num_groups)[group_ids]
    return jnp.where(constant, 0.0, advantages)


def dynamic_sampling_filter(
    rewards: np.ndarray, group_ids: np.ndarray, *, max_groups: int | None = None
) -> np.ndarray:
    """Host-side DAPO dynamic sampling: indices of the samples to keep from a rollout.

    Drops every group whose rewards are all equal (it carries no gradient), keeping whole
    groups in order of first appearance, at most `max_groups` of them. Group ids may be any
    integers here. Returns [K] int indices into the rollout, in rollout order; the caller
    over-samples, filters and refills until the batch is full.
    """
    rewards = np.asarray(rewards)
    group_ids = np.asarray(group_ids)
    unique_ids, first_seen, inverse = np.unique(group_ids, return_index=True, return_inverse=True)
    group_max = np.full(len(unique_ids), -np.inf)
    group_min = np.full(len(unique_ids), np.inf)
    np.maximum.at(group_max, inverse, rewards)
    np.minimum.at(group_min, inverse, rewards)
    varied = group_max != group_min
    kept_groups = [g for g in np.argsort(first_seen, kind="stable") if varied[g]][:max_groups]
    return np.flatnonzero(np.isin(inverse, kept_groups))


def soft_overlong_penalty(lengths: jax.Array, max_len: int, cache_len: int) -> jax.Array:
    """[N] completion lengths in tokens -> [N] f32 DAPO soft overlong punishment.

    0 if L <= max_len - cache_len; (max_len - cache_len - L) / cache_len inside the buffer
    (falls linearly from 0 to -1); -1 if L > max_len. Added to the task reward.
    """
    lengths = jnp.asarray(lengths, jnp.float32)
    safe_len = max_len - cache_len
    in_buffer = (safe_len - lengths) / cache_len
    return jnp.where(lengths <= safe_len, 0.0, jnp.where(lengths <= max_len, in_buffer, -1.0))
