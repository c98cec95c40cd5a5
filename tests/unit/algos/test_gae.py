"""GAE against a plain-Python loop, a hand-worked example and the gamma = lam = 1 identity."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf.algos.advantages import gae


def gae_reference(rewards, values, mask, gamma, lam, bootstrap=None):
    """GAE row by row over the real positions only, in plain Python."""
    advantages = [[0.0] * len(row) for row in rewards]
    returns = [[0.0] * len(row) for row in rewards]
    for b in range(len(rewards)):
        steps = [t for t in range(len(rewards[b])) if mask[b][t]]
        next_value = 0.0 if bootstrap is None else bootstrap[b]
        running = 0.0
        for t in reversed(steps):
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            running = delta + gamma * lam * running
            advantages[b][t] = running
            returns[b][t] = running + values[b][t]
            next_value = values[b][t]
    return advantages, returns


def test_three_step_hand_example():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.8)
    # delta = [0.9*0.6-0.5, 0.9*0.7-0.6, 1-0.7] = [0.04, 0.03, 0.3]; A_t = delta_t + 0.72 A_{t+1}
    assert advantages[0].tolist() == pytest.approx([0.21712, 0.246, 0.3])
    assert returns[0].tolist() == pytest.approx([0.71712, 0.846, 1.0])


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.5, 0.0)])
def test_against_loop_with_right_padding_and_left_offsets(gamma, lam):
    torch.manual_seed(0)
    width = 9
    spans = [(0, 9), (0, 4), (2, 7), (0, 1), (5, 9), (3, 4)]  # [start, end) of each row's response
    mask = torch.tensor([[1.0 if s <= t < e else 0.0 for t in range(width)] for s, e in spans])
    rewards = torch.randn(len(spans), width, dtype=torch.float64)
    values = torch.randn(len(spans), width, dtype=torch.float64)
    expected_adv, expected_ret = gae_reference(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    rewards[mask == 0] = float("nan")  # padding must not leak into any real position
    values[mask == 0] = float("inf")
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(advantages, torch.tensor(expected_adv, dtype=torch.float64))
    torch.testing.assert_close(returns, torch.tensor(expected_ret, dtype=torch.float64))


def test_interior_zeros_are_skipped():
    torch.manual_seed(1)
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 0], [0, 1, 0, 1, 0, 1, 1]])
    rewards, values = torch.randn(2, 7, dtype=torch.float64), torch.randn(2, 7, dtype=torch.float64)
    expected_adv, _ = gae_reference(rewards.tolist(), values.tolist(), mask.tolist(), 0.9, 0.7)
    advantages, _ = gae(rewards, values, mask, 0.9, 0.7)
    torch.testing.assert_close(advantages, torch.tensor(expected_adv, dtype=torch.float64))


def test_bootstrap_changes_only_the_truncated_row():
    torch.manual_seed(2)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    rewards, values = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    bootstrap = torch.tensor([0.0, 2.5, 0.0], dtype=torch.float64)
    plain, _ = gae(rewards, values, mask, 0.9, 0.8)
    boot, _ = gae(rewards, values, mask, 0.9, 0.8, bootstrap_values=bootstrap)
    torch.testing.assert_close(boot[[0, 2]], plain[[0, 2]])
    expected, _ = gae_reference(rewards.tolist(), values.tolist(), mask.tolist(), 0.9, 0.8, bootstrap.tolist())
    torch.testing.assert_close(boot, torch.tensor(expected, dtype=torch.float64))
    # the last real token of the truncated row sees gamma * 2.5 instead of 0
    assert (boot[1, 3] - plain[1, 3]).item() == pytest.approx(0.9 * 2.5)


def test_outputs_are_detached_targets():
    values = torch.randn(2, 3, requires_grad=True)
    advantages, returns = gae(torch.randn(2, 3), values, torch.ones(2, 3))
    assert not advantages.requires_grad and not returns.requires_grad


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 6), st.lists(st.floats(-5, 5), min_size=12, max_size=12)),
        min_size=1,
        max_size=4,
    )
)
def test_gamma_lambda_one_is_reward_to_go_minus_value(rows):
    """With gamma = lam = 1, A_t = sum_{k >= t} r_k - V_t over the real tokens."""
    width = 6
    lengths = [n for n, _ in rows]
    rewards = torch.tensor([numbers[:width] for _, numbers in rows], dtype=torch.float64)
    values = torch.tensor([numbers[width:] for _, numbers in rows], dtype=torch.float64)
    mask = torch.tensor([[t < n for t in range(width)] for n in lengths])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    for b, n in enumerate(lengths):
        for t in range(n):
            reward_to_go = rewards[b, t:n].sum().item()
            assert advantages[b, t].item() == pytest.approx(reward_to_go - values[b, t].item(), abs=1e-9)
            assert returns[b, t].item() == pytest.approx(reward_to_go, abs=1e-9)
        assert (advantages[b, n:] == 0).all()
