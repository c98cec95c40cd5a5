"""Masked statistics and loss aggregations against plain-Python references."""

import math

import pytest
import torch

from rlhf.algos.aggregation import (
    LOSS_AGGREGATIONS,
    aggregate,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    whiten,
)
from rlhf.errors import ConfigError


def right_padded_mask(lengths, width):
    return torch.tensor([[1.0 if t < n else 0.0 for t in range(width)] for n in lengths])


def real_entries(x, mask):
    return [[x[b][t] for t in range(len(x[b])) if mask[b][t]] for b in range(len(x))]


@pytest.fixture
def batch():
    torch.manual_seed(0)
    lengths = [3, 8, 1, 5, 6, 2, 7, 4]
    mask = right_padded_mask(lengths, 8)
    loss = torch.randn(8, 8, dtype=torch.float64)
    loss[mask == 0] = float("nan")  # padding must never reach a result
    return loss, mask


def test_masked_sum_mean_var_against_loops(batch):
    loss, mask = batch
    rows = real_entries(loss.tolist(), mask.tolist())
    flat = [v for row in rows for v in row]
    mean = sum(flat) / len(flat)
    var = sum((v - mean) ** 2 for v in flat) / (len(flat) - 1)
    assert masked_sum(loss, mask).item() == pytest.approx(sum(flat))
    assert masked_mean(loss, mask).item() == pytest.approx(mean)
    assert masked_var(loss, mask).item() == pytest.approx(var)
    assert masked_var(loss, mask, unbiased=False).item() == pytest.approx(var * (len(flat) - 1) / len(flat))
    per_row = masked_mean(loss, mask, dim=-1)
    assert per_row.tolist() == pytest.approx([sum(r) / len(r) for r in rows])
    assert masked_sum(loss, mask.bool(), dim=-1).tolist() == pytest.approx([sum(r) for r in rows])


def test_masked_mean_of_nothing_is_zero_not_nan():
    x = torch.tensor([[1.0, float("nan")]])
    mask = torch.zeros(1, 2)
    assert masked_mean(x, mask).item() == 0.0
    assert masked_mean(x, mask, dim=-1).tolist() == [0.0]


def test_masked_whiten(batch):
    loss, mask = batch
    whitened = masked_whiten(loss, mask)
    assert masked_mean(whitened, mask).item() == pytest.approx(0.0, abs=1e-9)
    assert masked_var(whitened, mask).item() == pytest.approx(1.0, rel=1e-6)
    assert (whitened[mask == 0] == 0).all()
    kept_mean = masked_whiten(loss, mask, shift_mean=False)
    assert masked_mean(kept_mean, mask).item() == pytest.approx(masked_mean(loss, mask).item())
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    expected = (x - 2.5) / math.sqrt(x.var().item() + 1e-8)
    torch.testing.assert_close(whiten(x), expected)


def test_shapes_must_match():
    with pytest.raises(ValueError, match="shapes must match"):
        masked_mean(torch.zeros(2, 3), torch.ones(2, 4))


def reference(loss, mask, mode, num_tokens=None, max_len=None, num_seqs=None):
    rows = [r for r in real_entries(loss.tolist(), mask.tolist())]
    nonempty = [r for r in rows if r]
    total = sum(v for r in rows for v in r)
    if mode in ("token_mean", "bnpo"):
        return total / sum(len(r) for r in rows)
    if mode in ("seq_mean_token_mean", "grpo"):
        return sum(sum(r) / len(r) for r in nonempty) / (num_seqs or len(nonempty))
    if mode == "seq_mean_token_sum":
        return sum(sum(r) for r in nonempty) / (num_seqs or len(nonempty))
    if mode == "dr_grpo":
        return total / ((num_seqs or len(rows)) * max_len)
    if mode == "dapo":
        return total / num_tokens
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS.names())
def test_every_aggregation_against_reference(batch, mode):
    loss, mask = batch
    kwargs = {"num_tokens": 29.0, "max_len": 16}
    got = aggregate(loss, mask, mode, **kwargs).item()
    assert got == pytest.approx(reference(loss, mask, mode, **kwargs))


def test_hand_numbers():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate(loss, mask, "token_mean").item() == pytest.approx(10 / 4)
    assert aggregate(loss, mask, "seq_mean_token_mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate(loss, mask, "seq_mean_token_sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate(loss, mask, "dr_grpo", max_len=5).item() == pytest.approx(10 / (2 * 5))
    assert aggregate(loss, mask, "dapo", num_tokens=8).item() == pytest.approx(10 / 8)


def test_dapo_is_independent_of_the_split(batch):
    """One micro-batch of 8 or four of 2: the micro-batch losses add up to the same step loss."""
    loss, mask = batch
    num_tokens = mask.sum()  # a tensor, as after an all-reduce over ranks
    full = aggregate(loss, mask, "dapo", num_tokens=num_tokens)
    split = sum(aggregate(l, m, "dapo", num_tokens=num_tokens) for l, m in zip(loss.split(2), mask.split(2)))
    torch.testing.assert_close(split, full)
    assert full.item() == pytest.approx(aggregate(loss, mask, "token_mean").item())
    # The per-micro-batch token mean does depend on the split (this is why dapo exists).
    averaged = sum(aggregate(l, m, "token_mean") for l, m in zip(loss.split(2), mask.split(2))) / 4
    assert averaged.item() != pytest.approx(full.item())


def test_sequence_means_split_with_num_seqs(batch):
    loss, mask = batch
    for mode in ("seq_mean_token_mean", "seq_mean_token_sum", "dr_grpo"):
        full = aggregate(loss, mask, mode, num_seqs=8, max_len=8)
        split = sum(aggregate(l, m, mode, num_seqs=8, max_len=8) for l, m in zip(loss.split(2), mask.split(2)))
        torch.testing.assert_close(split, full)


def test_gradient_ignores_padding(batch):
    loss, mask = batch
    loss = loss.clone().requires_grad_()
    aggregate(loss, mask, "seq_mean_token_mean").backward()
    assert torch.isfinite(loss.grad).all()
    assert (loss.grad[mask == 0] == 0).all()


def test_missing_or_unknown_arguments():
    loss, mask = torch.ones(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="num_tokens"):
        aggregate(loss, mask, "dapo")
    with pytest.raises(ValueError, match="max_len"):
        aggregate(loss, mask, "dr_grpo")
    with pytest.raises(ConfigError, match="token_mean"):
        aggregate(loss, mask, "token_men")


def test_batch_statistics_over_processes_equal_those_of_the_whole_batch():
    """Two 'processes' each holding half a batch, their sums exchanged by `reduce`: whitening, GRPO's batch
    scale and REINFORCE++'s normalisation give what one process holding the whole batch gives."""
    from rlhf.algos.advantages import group_advantages, reinforce_pp_advantages
    from rlhf.algos.aggregation import masked_moments, masked_whiten

    torch.manual_seed(0)
    x, mask = torch.randn(6, 5), (torch.rand(6, 5) > 0.3).float()
    halves = [(x[:3], mask[:3]), (x[3:], mask[3:])]

    def totals(xs, ms):
        m = (ms != 0).double()
        return torch.stack([m.sum(), (xs.double() * m).sum(), (xs.double() ** 2 * m).sum()])

    for i, (xs, ms) in enumerate(halves):
        other = totals(*halves[1 - i])
        local = masked_whiten(xs, ms, reduce=lambda t: t + other)
        torch.testing.assert_close(local, masked_whiten(x, mask)[i * 3:(i + 1) * 3])
    mean, var = masked_moments(x, mask)
    torch.testing.assert_close(mean, (x * mask).sum() / mask.sum())
    torch.testing.assert_close(var, x[mask.bool()].var())

    rewards = torch.randn(8)  # 4 groups of 2; process 0 holds groups 0-1, process 1 groups 2-3
    ones = torch.ones(4)
    for estimator, kwargs in ((group_advantages, {"scale": "batch"}), (reinforce_pp_advantages, {})):
        whole = estimator(rewards, 2, **kwargs)
        for i in range(2):
            mine, theirs = rewards[i * 4:(i + 1) * 4], rewards[(1 - i) * 4:(2 - i) * 4]
            if estimator is reinforce_pp_advantages:  # its statistics are of the centred advantages
                theirs = (theirs.view(2, 2) - theirs.view(2, 2).mean(-1, keepdim=True)).view(-1)
            other = totals(theirs, ones)
            torch.testing.assert_close(estimator(mine, 2, reduce=lambda t: t + other, **kwargs),
                                       whole[i * 4:(i + 1) * 4])
