"""Losses over ranked lists (InstructGPT's all-pairs Bradley-Terry, centring) against plain loops and hand numbers."""

import math

import pytest
import torch

from rlhf.algos.reward_model import (
    RM_LOSSES,
    bradley_terry_loss,
    centering_loss,
    dense_scores,
    last_token_index,
    listwise_loss,
    pairwise_ranking_loss,
    ranking_centering_loss,
)
from rlhf.errors import ConfigError


def bt(chosen, rejected, margin=0.0, eps=0.0):
    d = chosen - rejected - margin
    log_sig = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    return -(1 - eps) * log_sig(d) - eps * log_sig(-d)


def all_pairs_reference(scores, lengths, margins=None, eps=0.0):
    out = []
    for n, (row, k_real) in enumerate(zip(scores.tolist(), lengths)):
        m = 0.0 if margins is None else margins[n]
        losses = [bt(row[j], row[k], m, eps) for j in range(k_real) for k in range(j + 1, k_real)]
        out.append(sum(losses) / len(losses))
    return out


def test_pairwise_ranking_hand_numbers():
    # One list of 3, best first, scores 2, 1, 0: pairs (2,1), (2,0), (1,0) -> d = 1, 2, 1.
    scores = torch.tensor([[2.0, 1.0, 0.0]])
    expected = (2 * math.log1p(math.exp(-1.0)) + math.log1p(math.exp(-2.0))) / 3
    assert pairwise_ranking_loss(scores).item() == pytest.approx(expected)
    assert pairwise_ranking_loss(torch.zeros(1, 2)).item() == pytest.approx(math.log(2))


def test_pairwise_ranking_with_two_candidates_is_bradley_terry():
    torch.manual_seed(0)
    scores = torch.randn(16, 2, dtype=torch.float64)
    margin = torch.rand(16, dtype=torch.float64)
    for kwargs in ({}, {"margin": margin}, {"margin": 0.3, "label_smoothing": 0.1}):
        torch.testing.assert_close(
            pairwise_ranking_loss(scores, reduction="none", **kwargs),
            bradley_terry_loss(scores[:, 0], scores[:, 1], reduction="none", **kwargs),
        )


def test_pairwise_ranking_against_loop_ragged_with_margin_and_smoothing():
    torch.manual_seed(1)
    lengths = [4, 2, 3, 4, 2]
    mask = torch.tensor([[k < n for k in range(4)] for n in lengths])
    scores = torch.randn(5, 4, dtype=torch.float64)
    margins = torch.tensor([0.0, 0.5, 1.0, -0.2, 0.1], dtype=torch.float64)
    expected = all_pairs_reference(scores, lengths, margins.tolist(), eps=0.05)
    noisy = scores.masked_fill(~mask, float("nan")).requires_grad_()  # padding must not matter
    loss = pairwise_ranking_loss(noisy, mask, margins, label_smoothing=0.05, reduction="none")
    assert loss.tolist() == pytest.approx(expected)
    loss.sum().backward()
    assert torch.isfinite(noisy.grad).all() and (noisy.grad[~mask] == 0).all()
    assert pairwise_ranking_loss(scores, mask, margins, 0.05).item() == pytest.approx(sum(expected) / 5)
    with pytest.raises(ValueError, match="at least 2"):
        pairwise_ranking_loss(scores, torch.tensor([[1, 0, 0, 0]] * 5))
    with pytest.raises(ValueError, match="one number per list"):
        pairwise_ranking_loss(scores, mask, torch.zeros(3))


def test_ranking_centering_loss():
    chosen, rejected = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0])
    pairs = torch.stack([chosen, rejected], dim=1)
    torch.testing.assert_close(ranking_centering_loss(pairs, None, 0.01), centering_loss(chosen, rejected, 0.01))
    # (1 + 2)^2, (1 + 3)^2, (2 + 3)^2 over three pairs.
    three = torch.tensor([[1.0, 2.0, 3.0]])
    assert ranking_centering_loss(three, None, 0.1).item() == pytest.approx(0.1 * (9 + 16 + 25) / 3)


def test_loss_registry():
    assert RM_LOSSES.get("pairwise") is pairwise_ranking_loss and RM_LOSSES.get("listwise") is listwise_loss
    scores = torch.randn(8, 2)
    torch.testing.assert_close(RM_LOSSES.get("listwise")(scores), RM_LOSSES.get("pairwise")(scores))
    with pytest.raises(ConfigError, match="Did you mean 'listwise'"):
        RM_LOSSES.get("listwize")


def test_per_token_rewards_summed_over_the_response():
    """Christiano et al. 2017: a trajectory's score is the sum of its per-token rewards; the same losses apply."""
    token_rewards = torch.tensor([[0.5, 0.1, 0.2, 0.3, 7.0], [0.5, -0.4, 0.1, 9.0, 9.0]], requires_grad=True)
    # prompt is position 0, responses follow, then right padding
    response_mask = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 0, 0]])
    scores = dense_scores(token_rewards, response_mask)
    assert scores.tolist() == pytest.approx([0.6, -0.3])
    loss = bradley_terry_loss(scores[:1], scores[1:])
    assert loss.item() == pytest.approx(bt(0.6, -0.3))
    loss.backward()
    # Every response token of chosen gets the same gradient; the prompt and padding get none.
    grad = token_rewards.grad
    assert grad[0, 1:4].tolist() == pytest.approx([grad[0, 1].item()] * 3)
    assert grad[0, 0] == 0 and grad[0, 4] == 0 and grad[1, 3:].abs().sum() == 0


def test_last_token_index_matches_a_loop_for_random_padding():
    torch.manual_seed(2)
    lengths = torch.randint(1, 9, (32,)).tolist()
    right = torch.tensor([[1] * n + [0] * (8 - n) for n in lengths])
    left = right.flip(-1)
    assert last_token_index(right).tolist() == [n - 1 for n in lengths]
    assert last_token_index(left).tolist() == [7] * 32
