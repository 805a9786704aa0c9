"""Reward transforms for combining rewards (Wang et al., Transforming and Combining Rewards for
Aligning Large Language Models, arXiv 2402.00742).

The log-sigmoid transform u(x, y) = log sigmoid(r(x, y) - r_ref(x)) measures a reward relative to
a per-prompt reference reward r_ref(x) (the paper: a quantile of the base policy's rewards for x;
alignkit's eval uses the reference model's own sample). It saturates for responses already well
above the reference, so optimisation stops pushing one good property further, and sums of
transformed rewards act like a logical AND: the sum is high only when every reward beats its
reference (paper, sec. 3-4).
"""

from __future__ import annotations

import numpy as np


def log_sigmoid_transform(rewards, reference_rewards) -> list[float]:
    """log sigmoid(r - r_ref), elementwise, computed stably (-softplus(-(r - r_ref)))."""
    r = np.asarray(rewards, dtype=np.float64)
    ref = np.asarray(reference_rewards, dtype=np.float64)
    if r.shape != ref.shape:
        raise ValueError(f"rewards and reference rewards must have the same shape; got {r.shape} and {ref.shape}")
    return (-np.logaddexp(0.0, -(r - ref))).tolist()


def combine_log_sigmoid(rewards: dict, reference_rewards: dict, weights: dict | None = None) -> list[float]:
    """sum_i w_i log sigmoid(r_i - r_ref,i) over named rewards (weights default to 1)."""
    if set(rewards) != set(reference_rewards):
        raise ValueError(
            f"need a reference for every reward: rewards {sorted(rewards)}, references {sorted(reference_rewards)}"
        )
    weights = weights or {}
    total = None
    for name, values in rewards.items():
        u = np.asarray(log_sigmoid_transform(values, reference_rewards[name])) * float(weights.get(name, 1.0))
        total = u if total is None else total + u
    return total.tolist()
