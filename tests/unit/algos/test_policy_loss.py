"""Clipped policy loss (PPO / Clip-Higher / dual-clip / GSPO) and clipped value loss."""

import math

import pytest
import torch

from rlhf.algos.aggregation import aggregate
from rlhf.algos.policy import clipped_policy_loss, clipped_value_loss
from rlhf.errors import ConfigError


def policy_loss_at(ratios, advantages, **kwargs):
    """Loss and d loss / d logprob for single tokens with the given ratios and advantages."""
    old_logprobs = torch.full((len(ratios), 1), -1.0, dtype=torch.float64)
    logprobs = (old_logprobs + torch.tensor(ratios, dtype=torch.float64).log()[:, None]).requires_grad_()
    loss, stats = clipped_policy_loss(logprobs, old_logprobs, torch.tensor(advantages, dtype=torch.float64), **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), logprobs)
    return loss[:, 0].tolist(), grad[:, 0].tolist(), stats


def test_ratio_one_gives_minus_advantage():
    for level in ("token", "sequence"):
        loss, grad, _ = policy_loss_at([1.0, 1.0, 1.0], [2.0, -0.5, 0.0], ratio_level=level)
        assert loss == pytest.approx([-2.0, 0.5, 0.0])
        assert grad == pytest.approx([-2.0, 0.5, 0.0])  # d(-A * ratio)/d logp = -A * ratio


def test_clip_boundaries_positive_advantage():
    ratios = [0.5, 1.19, 1.2, 1.21, 3.0]
    loss, grad, stats = policy_loss_at(ratios, [1.0] * 5, eps_low=0.2)
    assert loss == pytest.approx([-0.5, -1.19, -1.2, -1.2, -1.2])
    # inside the range and below it the gradient flows; above 1 + eps it is cut
    assert grad[0] == pytest.approx(-0.5) and grad[1] == pytest.approx(-1.19)
    assert grad[3] == 0.0 and grad[4] == 0.0
    assert stats["clip_frac_high"].item() == pytest.approx(2 / 5)
    assert stats["clip_frac_low"].item() == 0.0


def test_clip_boundaries_negative_advantage():
    ratios = [0.5, 0.79, 0.8, 0.81, 3.0]
    loss, grad, stats = policy_loss_at(ratios, [-1.0] * 5, eps_low=0.2)
    assert loss == pytest.approx([0.8, 0.8, 0.8, 0.81, 3.0])
    assert grad[0] == 0.0 and grad[1] == 0.0
    assert grad[3] == pytest.approx(0.81) and grad[4] == pytest.approx(3.0)
    assert stats["clip_frac_low"].item() == pytest.approx(2 / 5)


def test_eps_high_only_affects_positive_advantages():
    ratios = [0.5, 0.9, 1.1, 1.25, 1.3, 2.0] * 2
    advantages = [1.0] * 6 + [-1.0] * 6
    symmetric, _, _ = policy_loss_at(ratios, advantages, eps_low=0.2)
    higher, _, _ = policy_loss_at(ratios, advantages, eps_low=0.2, eps_high=0.28)
    assert higher[6:] == pytest.approx(symmetric[6:])
    assert higher[:6] == pytest.approx([-0.5, -0.9, -1.1, -1.25, -1.28, -1.28])
    assert symmetric[:6] == pytest.approx([-0.5, -0.9, -1.1, -1.2, -1.2, -1.2])


def test_dual_clip_bounds_negative_advantages():
    loss, grad, stats = policy_loss_at([2.0, 5.0, 5.0], [-1.0, -1.0, 1.0], dual_clip=3.0)
    assert loss == pytest.approx([2.0, 3.0, -1.2])
    assert grad == pytest.approx([2.0, 0.0, 0.0])
    assert stats["dual_clip_frac"].item() == pytest.approx(1 / 3)
    with pytest.raises(ConfigError, match="dual_clip"):
        policy_loss_at([1.0], [1.0], dual_clip=1.0)


def test_token_losses_against_a_loop():
    torch.manual_seed(0)
    logprobs = -torch.rand(4, 6, dtype=torch.float64) * 3
    old_logprobs = logprobs + 0.3 * torch.randn(4, 6, dtype=torch.float64)
    advantages = torch.randn(4, 6, dtype=torch.float64)
    loss, stats = clipped_policy_loss(logprobs, old_logprobs, advantages, eps_low=0.1, eps_high=0.3, dual_clip=2.0)
    ratios = []
    for b in range(4):
        for t in range(6):
            a = advantages[b, t].item()
            r = math.exp(logprobs[b, t].item() - old_logprobs[b, t].item())
            ratios.append(r)
            expected = max(-a * r, -a * min(max(r, 0.9), 1.3))
            if a < 0:
                expected = min(expected, -a * 2.0)
            assert loss[b, t].item() == pytest.approx(expected)
    assert stats["ratio_mean"].item() == pytest.approx(sum(ratios) / len(ratios))
    assert stats["approx_kl"].item() == pytest.approx(sum(r - 1 - math.log(r) for r in ratios) / len(ratios))


def test_sequence_advantages_broadcast_and_padding_is_ignored():
    torch.manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    old_logprobs = -torch.rand(2, 4)
    logprobs = (old_logprobs + 0.1 * torch.randn(2, 4)).masked_fill(mask == 0, float("nan")).requires_grad_()
    advantages = torch.tensor([1.0, -2.0])
    loss, _ = clipped_policy_loss(logprobs, old_logprobs, advantages, mask)
    expanded, _ = clipped_policy_loss(logprobs, old_logprobs, advantages[:, None].expand(2, 4), mask)
    torch.testing.assert_close(loss, expanded)
    assert (loss[mask == 0] == 0).all()
    aggregate(loss, mask, "token_mean").backward()
    assert torch.isfinite(logprobs.grad).all() and (logprobs.grad[mask == 0] == 0).all()


def test_gspo_sequence_ratio_is_exp_of_mean_log_ratio():
    torch.manual_seed(2)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    old_logprobs = -torch.rand(2, 4, dtype=torch.float64)
    logprobs = (old_logprobs + 0.05 * torch.randn(2, 4, dtype=torch.float64)).requires_grad_()
    advantages = torch.tensor([1.5, -0.5], dtype=torch.float64)
    loss, stats = clipped_policy_loss(
        logprobs, old_logprobs, advantages, mask, eps_low=10.0, eps_high=10.0, ratio_level="sequence"
    )
    (grad,) = torch.autograd.grad(loss.sum(), logprobs)
    for b, length in enumerate([4, 2]):
        mean_log_ratio = sum(logprobs[b, t].item() - old_logprobs[b, t].item() for t in range(length)) / length
        s = math.exp(mean_log_ratio)
        for t in range(length):
            assert loss[b, t].item() == pytest.approx(-advantages[b].item() * s)
            # GSPO-token: value s_i at every token, gradient s_i * grad log pi(y_t) per token
            assert grad[b, t].item() == pytest.approx(-advantages[b].item() * s)
        assert (grad[b, length:] == 0).all()


def test_gspo_clips_whole_sequences():
    old_logprobs = torch.zeros(1, 3, dtype=torch.float64)
    logprobs = torch.tensor([[0.3, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)  # s = exp(0.1)
    loss, stats = clipped_policy_loss(logprobs, old_logprobs, torch.tensor([1.0]), eps_low=0.05, ratio_level="sequence")
    assert loss[0].tolist() == pytest.approx([-1.05] * 3)
    (grad,) = torch.autograd.grad(loss.sum(), logprobs)
    assert (grad == 0).all()
    assert stats["clip_frac_high"].item() == 1.0


def test_bad_policy_arguments():
    x = torch.zeros(1, 2)
    with pytest.raises(ConfigError, match="ratio_level"):
        clipped_policy_loss(x, x, torch.zeros(1), ratio_level="seq")
    with pytest.raises(ConfigError, match="clip ranges"):
        clipped_policy_loss(x, x, torch.zeros(1), eps_low=-0.1)
    with pytest.raises(ValueError, match="shapes must match"):
        clipped_policy_loss(x, x, torch.zeros(1, 3))


def test_huge_log_ratios_stay_finite():
    logprobs = torch.tensor([[0.0]], requires_grad=True)
    loss, _ = clipped_policy_loss(logprobs, torch.tensor([[-500.0]]), torch.tensor([-1.0]))
    assert torch.isfinite(loss).all() and loss.item() == pytest.approx(math.exp(20.0), rel=1e-5)


def test_value_loss_clipping():
    values = torch.tensor([[1.5, 1.1, 0.5, 9.0]], requires_grad=True)
    old_values = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    returns = torch.tensor([[2.0, 2.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = clipped_value_loss(values, old_values, returns, mask, value_clip=0.2)
    # V=1.5 is clipped to 1.2: 0.5 * max(0.25, 0.64); V=1.1 inside; V=0.5: unclipped error 2.25 > clipped 1.44
    assert loss[0].tolist() == pytest.approx([0.32, 0.405, 1.125, 0.0])
    (grad,) = torch.autograd.grad(loss.sum(), values)
    assert grad[0].tolist() == pytest.approx([0.0, -0.9, -1.5, 0.0])
    assert stats["value_clip_frac"].item() == pytest.approx(1 / 3)
    plain, _ = clipped_value_loss(values, old_values, returns, mask, value_clip=None)
    assert plain[0].tolist() == pytest.approx([0.125, 0.405, 1.125, 0.0])
    with pytest.raises(ConfigError, match="value_clip"):
        clipped_value_loss(values, old_values, returns, value_clip=0.0)
