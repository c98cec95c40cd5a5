"""Placing sequence scores on the last response token, and the KL-shaped per-token reward."""

import pytest
import torch

from rlhf.algos.advantages import gae
from rlhf.algos.reward_shaping import cut_response_scores, kl_shaped_rewards, place_sequence_rewards


def test_score_lands_on_the_last_real_token_never_on_padding():
    action_mask = torch.tensor(
        [
            [1, 1, 1, 0, 0],  # right padding
            [0, 0, 1, 1, 1],  # prompt positions before the response, no padding after
            [0, 1, 1, 0, 0],  # both
            [0, 0, 0, 0, 0],  # nothing generated: nothing to credit
        ]
    )
    rewards = place_sequence_rewards(torch.tensor([1.0, 2.0, 3.0, 4.0]), action_mask)
    expected = torch.zeros(4, 5)
    expected[0, 2], expected[1, 4], expected[2, 2] = 1.0, 2.0, 3.0
    torch.testing.assert_close(rewards, expected)


def test_kl_shaped_rewards():
    action_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    kl = torch.tensor([[0.1, 0.2, 0.3, float("nan")], [0.5, -0.5, 7.0, 7.0]])
    rewards = kl_shaped_rewards(torch.tensor([1.0, -1.0]), kl, kl_coef=0.1, action_mask=action_mask)
    assert rewards[0].tolist() == pytest.approx([-0.01, -0.02, 1.0 - 0.03, 0.0])
    assert rewards[1].tolist() == pytest.approx([-0.05, -1.0 + 0.05, 0.0, 0.0])


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="scores must be"):
        place_sequence_rewards(torch.ones(3), torch.ones(2, 4))


def test_overlong_penalty_is_zero_then_linear_over_the_buffer():
    from rlhf.algos.reward_shaping import overlong_penalty

    # L_max = 20, buffer 4: free up to 16, then -1/4 per token, -1 at the limit (DAPO eq. 13)
    lengths = torch.tensor([3, 16, 17, 18, 20])
    torch.testing.assert_close(overlong_penalty(lengths, 20, 4), torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0]))
    torch.testing.assert_close(overlong_penalty(lengths, 20, 4, penalty=0.5)[-1], torch.tensor(-0.5))
    with pytest.raises(ValueError, match="overlong buffer"):
        overlong_penalty(lengths, 20, 0)


def test_a_truncated_response_is_counted_once_terminal_or_bootstrapped():
    """Row 0 was cut by the length limit after 2 tokens (score 1.0, V = 0.5 and 0.8 before its tokens, V(s_T) = 0.9
    after the last); row 1 ended with EOS (score 2.0). gamma = lam = 1, no KL."""
    scores, truncated = torch.tensor([1.0, 2.0]), torch.tensor([True, False])
    values, last_values = torch.tensor([[0.5, 0.8], [1.0, 1.5]]), torch.tensor([0.9, 0.7])
    mask = torch.ones(2, 2)

    def returns_and_advantages(truncation):
        s, bootstrap = cut_response_scores(scores, truncated, last_values, truncation)
        advantages, returns = gae(place_sequence_rewards(s, mask), values, mask, 1.0, 1.0, bootstrap)
        return sum(returns.tolist(), []), advantages.tolist()

    # terminal: the score at the cut is the return; V after it is 0
    returns, advantages = returns_and_advantages("terminal")
    assert returns == pytest.approx([1.0, 1.0, 2.0, 2.0]) and advantages[0] == pytest.approx([0.5, 0.2])
    # bootstrap: no score at the cut, the return is V(s_T); the row that ended is untouched
    returns, advantages = returns_and_advantages("bootstrap")
    assert returns == pytest.approx([0.9, 0.9, 2.0, 2.0]) and advantages[0] == pytest.approx([0.4, 0.1])
    # never the score plus V(s_T) (1.9): the rest of the episode counted twice
    with pytest.raises(ValueError, match="terminal or bootstrap"):
        cut_response_scores(scores, truncated, last_values, "both")
