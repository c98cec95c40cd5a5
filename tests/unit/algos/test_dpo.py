"""DPO-family losses against hand numbers and a plain per-pair loop; gradients, smoothing, SimPO lengths, metrics."""

import math

import pytest
import torch

from rlhf.algos.dpo import DPO_LOSSES, implicit_rewards, preference_metrics, simpo_loss
from rlhf.errors import ConfigError


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def reference_loss(name, h, beta, eps):
    if name == "sigmoid":
        return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    if name == "robust":
        return (-(1 - eps) * log_sigmoid(beta * h) + eps * log_sigmoid(-beta * h)) / (1 - 2 * eps)
    if name == "hinge":
        return max(0.0, 1 - beta * h)
    return (h - 1 / (2 * beta)) ** 2


def pairs(h, dtype=torch.float64):
    """Inputs (policy_chosen, policy_rejected, ref_chosen, ref_rejected) whose log-ratio margin is h."""
    h = torch.as_tensor(h, dtype=dtype)
    return h - 5.0, torch.full_like(h, -7.0), torch.full_like(h, -5.0), torch.full_like(h, -7.0)


def test_hand_numbers():
    one = pairs([1.0])  # h = (-4 - -5) - (-7 - -7) = 1
    # sigmoid: -log sigma(0.1) = log(1 + e^-0.1) = 0.644397
    assert DPO_LOSSES.get("sigmoid")(*one, beta=0.1).item() == pytest.approx(0.644397, abs=1e-6)
    # cDPO eps = 0.1: 0.9 * 0.644397 + 0.1 * log(1 + e^0.1) = 0.9 * 0.644397 + 0.1 * 0.744397 = 0.654397
    assert DPO_LOSSES.get("sigmoid")(*one, beta=0.1, label_smoothing=0.1).item() == pytest.approx(0.654397, abs=1e-6)
    # robust eps = 0.1: (0.9 * 0.644397 - 0.1 * 0.744397) / 0.8 = 0.631897
    assert DPO_LOSSES.get("robust")(*one, beta=0.1, label_smoothing=0.1).item() == pytest.approx(0.631897, abs=1e-6)
    # hinge: max(0, 1 - 0.1 * 1) = 0.9, and 0 once h >= 1 / beta = 10
    assert DPO_LOSSES.get("hinge")(*pairs([1.0, 10.0, 25.0]), beta=0.1).tolist() == pytest.approx([0.9, 0.0, 0.0])
    # ipo: (1 - 1 / 0.2)^2 = 16, (5 - 5)^2 = 0
    assert DPO_LOSSES.get("ipo")(*pairs([1.0, 5.0]), beta=0.1).tolist() == pytest.approx([16.0, 0.0])
    # simpo: averages -10 / 5 = -2 and -30 / 10 = -3, beta = 2, gamma = 0.5 * 2 = 1: z = 2 * 1 - 1 = 1, log(1 + e^-1)
    loss = simpo_loss(torch.tensor([-10.0]), torch.tensor([-30.0]), torch.tensor([5]), torch.tensor([10]), beta=2.0)
    assert loss.item() == pytest.approx(0.313262, abs=1e-6)


@pytest.mark.parametrize("name", ["sigmoid", "robust", "hinge", "ipo"])
def test_against_plain_loop(name):
    generator = torch.Generator().manual_seed(0)
    inputs = [-20 * torch.rand(64, dtype=torch.float64, generator=generator) for _ in range(4)]
    beta, eps = 0.3, (0.2 if name in ("sigmoid", "robust") else 0.0)
    loss = DPO_LOSSES.get(name)(*inputs, beta=beta, label_smoothing=eps)
    hs = [(pc - rc) - (pr - rr) for pc, pr, rc, rr in zip(*(x.tolist() for x in inputs))]
    assert loss.shape == (64,)
    assert loss.tolist() == pytest.approx([reference_loss(name, h, beta, eps) for h in hs], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", ["sigmoid", "robust", "hinge", "ipo"])
def test_a_step_raises_the_margin_and_reference_gets_no_gradient(name):
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = pairs([-3.0, -0.5, 0.0, 2.0])  # all below 1/(2 beta)
    policy_chosen.requires_grad_(), policy_rejected.requires_grad_()
    ref_chosen.requires_grad_(), ref_rejected.requires_grad_()
    DPO_LOSSES.get(name)(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1).sum().backward()
    assert (policy_chosen.grad < 0).all() and (policy_rejected.grad > 0).all()
    before = policy_chosen - policy_rejected
    after = (policy_chosen - 0.1 * policy_chosen.grad) - (policy_rejected - 0.1 * policy_rejected.grad)
    assert (after > before).all()
    assert ref_chosen.grad is None and ref_rejected.grad is None


@pytest.mark.parametrize("name", ["sigmoid", "robust"])
def test_label_smoothing_zero_is_plain_dpo_and_nonzero_changes_the_gradient(name):
    h = torch.linspace(-4, 4, 9, dtype=torch.float64)
    loss = DPO_LOSSES.get(name)(*pairs(h), beta=0.5)
    torch.testing.assert_close(loss, -torch.nn.functional.logsigmoid(0.5 * h))

    def grad(eps):
        policy_chosen, *rest = pairs(h)
        policy_chosen.requires_grad_()
        DPO_LOSSES.get(name)(policy_chosen, *rest, beta=0.5, label_smoothing=eps).sum().backward()
        return policy_chosen.grad

    assert not torch.allclose(grad(0.0), grad(0.2))


@pytest.mark.parametrize("eps", [0.05, 0.2, 0.45])
def test_robust_is_unbiased_under_label_flips(eps):
    h = torch.linspace(-30, 30, 13, dtype=torch.float64)
    robust = DPO_LOSSES.get("robust")
    flipped = robust(*pairs(-h), beta=0.2, label_smoothing=eps)  # chosen and rejected swapped: h -> -h
    expected = (1 - eps) * robust(*pairs(h), beta=0.2, label_smoothing=eps) + eps * flipped
    torch.testing.assert_close(expected, DPO_LOSSES.get("sigmoid")(*pairs(h), beta=0.2))


def test_ipo_minimum_is_at_one_over_two_beta():
    beta = 0.25
    h = torch.tensor([1 / (2 * beta) + d for d in (-0.1, 0.0, 0.1)], dtype=torch.float64)
    policy_chosen, *rest = pairs(h)
    policy_chosen.requires_grad_()
    loss = DPO_LOSSES.get("ipo")(policy_chosen, *rest, beta=beta)
    loss.sum().backward()
    assert loss[1].item() == 0.0 and policy_chosen.grad[1].item() == 0.0
    assert loss[0].item() > 0 and loss[2].item() > 0 and policy_chosen.grad[0] < 0 < policy_chosen.grad[2]


def test_simpo_uses_length_averaged_logprobs():
    average_chosen, average_rejected = torch.tensor([-1.0, -0.5]), torch.tensor([-1.5, -0.4])
    lengths = torch.tensor([3, 7])
    loss = simpo_loss(average_chosen * lengths, average_rejected * lengths, lengths, lengths, beta=2.0)
    doubled = simpo_loss(average_chosen * 2 * lengths, average_rejected * lengths, 2 * lengths, lengths, beta=2.0)
    torch.testing.assert_close(loss, doubled)
    longer = simpo_loss(average_chosen * lengths, average_rejected * lengths, 2 * lengths, lengths, beta=2.0)
    assert (longer < loss).all()  # the same sum over more tokens: a higher average, a smaller loss

    def grad(**kwargs):
        policy_chosen = (average_chosen * lengths).requires_grad_()
        simpo_loss(policy_chosen, average_rejected * lengths, lengths, lengths, beta=2.0, **kwargs).sum().backward()
        return policy_chosen.grad

    assert not torch.allclose(grad(), grad(gamma_beta_ratio=0.0))
    assert not torch.allclose(grad(), grad(label_smoothing=0.1))


def test_dtypes():
    for name in DPO_LOSSES:
        assert DPO_LOSSES.get(name)(*pairs([1.0], torch.bfloat16), beta=0.1).dtype == torch.float32
        assert DPO_LOSSES.get(name)(*pairs([1.0], torch.float64), beta=0.1).dtype == torch.float64
    ones = torch.ones(2, dtype=torch.long)
    assert simpo_loss(-ones.to(torch.bfloat16), -ones.to(torch.bfloat16), ones, ones, beta=1.0).dtype == torch.float32


def test_implicit_rewards_and_metrics():
    policy_chosen = torch.tensor([-4.0, -6.0, -5.0], requires_grad=True)
    policy_rejected = torch.tensor([-7.0, -5.0, -5.0], requires_grad=True)
    ref_chosen, ref_rejected = torch.tensor([-5.0, -5.0, -5.0]), torch.tensor([-7.0, -7.0, -5.0])
    rewards = implicit_rewards(policy_chosen, ref_chosen, beta=0.5)
    assert rewards.tolist() == pytest.approx([0.5, -0.5, 0.0]) and rewards.requires_grad
    metrics = preference_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.5)
    # chosen rewards [0.5, -0.5, 0], rejected [0, 1, 0]: margins [0.5, -1.5, 0]; only pair 0 is won (the tie is not)
    assert metrics.as_log() == pytest.approx(
        {"rewards/chosen": 0.0, "rewards/rejected": 1 / 3, "rewards/margin": -1 / 3, "rewards/accuracy": 1 / 3}
    )
    assert not any(value.requires_grad for value in metrics)


def test_bad_settings_are_refused_by_name():
    one = pairs([1.0])
    for name in DPO_LOSSES:
        for beta in (0.0, -1.0, float("nan")):
            with pytest.raises(ConfigError, match="beta"):
                DPO_LOSSES.get(name)(*one, beta=beta)
        for eps in (0.5, -0.1):
            with pytest.raises(ConfigError, match="label_smoothing"):
                DPO_LOSSES.get(name)(*one, beta=0.1, label_smoothing=eps)
    for name in ("hinge", "ipo"):  # a setting that would do nothing is refused, not ignored
        with pytest.raises(ConfigError, match="label_smoothing"):
            DPO_LOSSES.get(name)(*one, beta=0.1, label_smoothing=0.1)
    ones = torch.ones(1)
    with pytest.raises(ConfigError, match="beta"):
        simpo_loss(-ones, -ones, ones, ones, beta=0.0)
    with pytest.raises(ConfigError, match="gamma_beta_ratio"):
        simpo_loss(-ones, -ones, ones, ones, beta=1.0, gamma_beta_ratio=-0.5)
    with pytest.raises(ValueError, match="length"):
        simpo_loss(-ones, -ones, ones, 0 * ones, beta=1.0)
    with pytest.raises(ValueError, match="shapes"):
        DPO_LOSSES.get("sigmoid")(*one[:3], torch.zeros(2), beta=0.1)


def test_registry_names():
    assert DPO_LOSSES.names() == ["hinge", "ipo", "robust", "sigmoid"]
    with pytest.raises(ConfigError, match="sigmoid"):
        DPO_LOSSES.get("sigmod")
