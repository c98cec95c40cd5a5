"""Critic-free advantage estimators over groups of samples: hand numbers, loops and properties."""

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf.algos.advantages import (
    ADVANTAGE_ESTIMATORS,
    group_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
    zero_variance_groups,
)
from rlhf.errors import ConfigError


def test_grpo_hand_numbers_with_a_zero_variance_group():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    advantages = group_advantages(rewards, group_size=4)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)  # (1 - 0.5) / (sample std of [1, 0, 1, 0] + eps)
    assert advantages.tolist() == pytest.approx([a, -a, a, -a, 0, 0, 0, 0], abs=1e-5)
    assert torch.isfinite(advantages).all()


def test_near_equal_continuous_rewards_stay_small_advantages():
    # a reward model scoring four near-identical answers: differences of 1e-5 are noise, not signal
    rewards = torch.tensor([0.50001, 0.5, 0.50002, 0.49999, 1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    advantages = group_advantages(rewards, group_size=4)
    assert advantages[:4].abs().max() < 0.15  # eps 1e-6 gave 0.9-1.1, the size of a real right/wrong split
    assert advantages[4:].abs().min() > 0.8
    assert rloo_advantages(rewards, 4, scale="group")[:4].abs().max() < 0.2


def test_grpo_scales_group_batch_none():
    rewards = torch.tensor([0.0, 2.0, 10.0, 14.0])
    per_group = group_advantages(rewards, 2, scale="group", eps=0.0)
    a, b = 1 / math.sqrt(2), 2 / math.sqrt(8)  # each group's own sample std: sqrt(2) and sqrt(8)
    assert per_group.tolist() == pytest.approx([-a, a, -b, b])
    batch_std = statistics.stdev([0.0, 2.0, 10.0, 14.0])
    by_batch = group_advantages(rewards, 2, scale="batch", eps=0.0)
    assert by_batch.tolist() == pytest.approx([-1 / batch_std, 1 / batch_std, -2 / batch_std, 2 / batch_std])
    assert group_advantages(rewards, 2, scale="none").tolist() == pytest.approx([-1, 1, -2, 2])
    with pytest.raises(ConfigError, match="scale"):
        group_advantages(rewards, 2, scale="global")


def test_rloo_hand_numbers_and_loop():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert rloo_advantages(rewards, 4).tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])
    torch.manual_seed(0)
    rewards = torch.randn(12, dtype=torch.float64)
    expected = []
    for g in range(4):
        group = rewards[g * 3 : (g + 1) * 3].tolist()
        for i, r in enumerate(group):
            expected.append(r - (sum(group) - r) / 2)
    assert rloo_advantages(rewards, 3).tolist() == pytest.approx(expected)


def test_reinforce_pp_whitens_over_the_batch():
    rewards = torch.tensor([0.0, 2.0, 10.0, 14.0])
    centred_std = statistics.stdev([-1.0, 1.0, -2.0, 2.0])
    got = reinforce_pp_advantages(rewards, 2, eps=0.0)
    assert got.tolist() == pytest.approx([-1 / centred_std, 1 / centred_std, -2 / centred_std, 2 / centred_std])
    single = reinforce_pp_advantages(rewards, 1, eps=0.0)  # one sample per prompt: plain global whitening
    std = statistics.stdev(rewards.tolist())
    assert single.tolist() == pytest.approx([(r - 6.5) / std for r in rewards.tolist()])
    assert reinforce_pp_advantages(rewards, 2, scale="none").tolist() == pytest.approx([-1, 1, -2, 2])
    with pytest.raises(ConfigError, match="scale"):
        reinforce_pp_advantages(rewards, 2, scale="group")


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_bad_group_sizes_are_refused(name):
    estimator = ADVANTAGE_ESTIMATORS.get(name)
    with pytest.raises(ConfigError, match="group_size=1"):
        estimator(torch.ones(4), 1)
    with pytest.raises(ConfigError, match="multiple of group_size"):
        estimator(torch.ones(10), 3)


def test_registry_and_integer_rewards():
    assert ADVANTAGE_ESTIMATORS.names() == ["grpo", "reinforce_pp", "rloo"]
    advantages = ADVANTAGE_ESTIMATORS.get("grpo")(torch.tensor([1, 0, 0, 0]), 4, scale=None)
    assert advantages.dtype == torch.float32 and advantages[0] > 0


@settings(max_examples=60, deadline=None)
@given(
    group_size=st.integers(2, 5),
    num_groups=st.integers(1, 4),
    data=st.data(),
)
def test_each_group_sums_to_zero(group_size, num_groups, data):
    values = data.draw(st.lists(st.floats(-10, 10), min_size=group_size * num_groups, max_size=group_size * num_groups))
    rewards = torch.tensor(values, dtype=torch.float64)
    for advantages in [
        group_advantages(rewards, group_size, scale="group"),
        group_advantages(rewards, group_size, scale="batch"),
        group_advantages(rewards, group_size, scale="none"),
        rloo_advantages(rewards, group_size),
    ]:
        assert torch.isfinite(advantages).all()
        sums = advantages.view(num_groups, group_size).sum(-1)
        assert sums.abs().max().item() < 1e-6


def test_zero_variance_groups():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5 + 1e-9, 0.2, 0.7, 0.3], dtype=torch.float64)
    assert zero_variance_groups(rewards, 3).tolist() == [True, False, True, False]
    assert zero_variance_groups(rewards, 3, tol=0.0).tolist() == [True, False, False, False]
