"""Reward-model losses and metrics against hand numbers and plain loops."""

import math

import pytest
import torch

from rlhf.algos.reward_model import (
    bradley_terry_loss,
    centering_loss,
    dense_scores,
    last_token_index,
    listwise_loss,
    pairwise_accuracy,
    ranking_auc,
    ranking_accuracy,
)
from rlhf.errors import ConfigError


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def test_bradley_terry_hand_numbers():
    zero = torch.tensor([0.0])
    assert bradley_terry_loss(zero, zero).item() == pytest.approx(math.log(2))
    chosen, rejected = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5])
    per_pair = bradley_terry_loss(chosen, rejected, reduction="none")
    assert per_pair.tolist() == pytest.approx([-log_sigmoid(1.0), -log_sigmoid(-1.0)])
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(per_pair.mean().item())
    assert bradley_terry_loss(chosen, rejected, reduction="sum").item() == pytest.approx(per_pair.sum().item())


def test_bradley_terry_margin_and_label_smoothing():
    chosen, rejected = torch.tensor([3.0]), torch.tensor([1.0])
    # d = 3 - 1 - 0.5 = 1.5
    assert bradley_terry_loss(chosen, rejected, margin=0.5).item() == pytest.approx(-log_sigmoid(1.5))
    per_pair_margin = torch.tensor([2.0])
    assert bradley_terry_loss(chosen, rejected, margin=per_pair_margin).item() == pytest.approx(math.log(2))
    eps = 0.1
    expected = -(1 - eps) * log_sigmoid(2.0) - eps * log_sigmoid(-2.0)
    assert bradley_terry_loss(chosen, rejected, label_smoothing=eps).item() == pytest.approx(expected)
    with pytest.raises(ConfigError, match="label_smoothing"):
        bradley_terry_loss(chosen, rejected, label_smoothing=0.5)
    with pytest.raises(ConfigError, match="reduction"):
        bradley_terry_loss(chosen, rejected, reduction="avg")


def listwise_reference(scores, lengths):
    losses = []
    for row, k_real in zip(scores.tolist(), lengths):
        loss = 0.0
        for k in range(k_real):
            loss -= row[k] - math.log(sum(math.exp(s) for s in row[k:k_real]))
        losses.append(loss)
    return losses


def test_listwise_with_two_candidates_is_bradley_terry():
    torch.manual_seed(0)
    scores = torch.randn(16, 2, dtype=torch.float64)
    torch.testing.assert_close(
        listwise_loss(scores, reduction="none"), bradley_terry_loss(scores[:, 0], scores[:, 1], reduction="none")
    )


def test_listwise_against_loop_for_four_and_ragged():
    torch.manual_seed(1)
    scores = torch.randn(5, 4, dtype=torch.float64)
    assert listwise_loss(scores, reduction="none").tolist() == pytest.approx(listwise_reference(scores, [4] * 5))
    lengths = [4, 2, 3, 4, 2]
    mask = torch.tensor([[k < n for k in range(4)] for n in lengths])
    scores = scores.masked_fill(~mask, float("nan")).requires_grad_()  # padding must not matter
    loss = listwise_loss(scores, mask, reduction="none")
    clean = torch.where(mask, scores, 0.0)
    assert loss.tolist() == pytest.approx(listwise_reference(clean, lengths))
    loss.sum().backward()
    assert torch.isfinite(scores.grad).all() and (scores.grad[~mask] == 0).all()
    with pytest.raises(ValueError, match="prefix"):
        listwise_loss(scores.detach(), torch.tensor([[1, 0, 1, 1]] * 5))


def test_centering_loss():
    chosen, rejected = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0])
    assert centering_loss(chosen, rejected, coef=0.01).item() == pytest.approx(0.01 * (1.5**2 + 1.0**2) / 2)


def test_dense_scores():
    token_rewards = torch.tensor([[0.1, 0.2, 0.3, 9.0], [1.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert dense_scores(token_rewards, mask).tolist() == pytest.approx([0.6, 1.0])


def test_last_token_index_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]
    assert last_token_index(right.bool()).tolist() == [2, 4, 0]
    with pytest.raises(ValueError, match="no real token"):
        last_token_index(torch.tensor([[1, 1], [0, 0]]))


def test_accuracies():
    chosen, rejected = torch.tensor([1.0, 0.0, 2.0, 1.0]), torch.tensor([0.0, 1.0, 1.0, 1.0])
    assert pairwise_accuracy(chosen, rejected).item() == pytest.approx(0.5)  # the tie counts as wrong
    scores = torch.stack([chosen, rejected], dim=1)
    assert ranking_accuracy(scores).item() == pytest.approx(0.5)
    ranked = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [3.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0]])
    # row 0: 3 of 3 pairs right; row 1: 0 of 3; row 2: 1 of 1 -> 4 / 7
    assert ranking_accuracy(ranked, mask).item() == pytest.approx(4 / 7)


def test_ranking_auc_hand_numbers_and_reference():
    # positives {3, 1}, negatives {2, 1, 0}: 3 beats all three; 1 beats 0, ties 1 (half), loses to 2 -> 4.5 / 6
    assert ranking_auc(torch.tensor([3.0, 1.0]), torch.tensor([2.0, 1.0, 0.0])).item() == pytest.approx(0.75)
    assert ranking_auc(torch.tensor([1.0, 1.0]), torch.tensor([1.0])).item() == pytest.approx(0.5)  # all ties
    assert math.isnan(ranking_auc(torch.tensor([1.0]), torch.tensor([])).item())
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 10, (37,), generator=g).float()  # whole numbers: exact ties, exact under 3x - 7
    neg = torch.randint(0, 8, (23,), generator=g).float()
    loop = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos.tolist() for n in neg.tolist()) / (37 * 23)
    assert ranking_auc(pos, neg).item() == pytest.approx(loop)
    # the scale and offset of the score do not matter
    assert ranking_auc(3 * pos - 7, 3 * neg - 7).item() == pytest.approx(loop)
