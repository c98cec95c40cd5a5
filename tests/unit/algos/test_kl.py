"""KL estimators (hand numbers, non-negativity, unbiasedness by Monte Carlo) and KL coefficient controllers."""

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from rlhf.algos.kl import K3_MAX, KL_ESTIMATORS, AdaptiveKLController, FixedKLController, kl_penalty
from rlhf.errors import ConfigError


def test_hand_numbers():
    logprobs, ref_logprobs = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -2.0])
    assert kl_penalty(logprobs, ref_logprobs, "k1").tolist() == pytest.approx([1.0, 0.0])
    assert kl_penalty(logprobs, ref_logprobs, "k2").tolist() == pytest.approx([0.5, 0.0])
    assert kl_penalty(logprobs, ref_logprobs, "k3").tolist() == pytest.approx([math.exp(-1.0), 0.0])
    with pytest.raises(ConfigError, match="k3"):
        kl_penalty(logprobs, ref_logprobs, "k4")


@settings(max_examples=300, deadline=None)
@given(st.floats(-1e4, 0.0), st.floats(-1e4, 0.0))
@example(-5.960464477539063e-08, 0.0)  # ratio near 1: exp(x) - x - 1 cancels to a negative float32
def test_k3_is_never_negative(logprob, ref_logprob):
    kl = kl_penalty(torch.tensor([logprob]), torch.tensor([ref_logprob]), "k3")
    assert torch.isfinite(kl).all() and kl.item() >= 0.0


def test_k1_and_k3_are_unbiased_by_monte_carlo():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    ref = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    true_kl = (p * (p / ref).log()).sum().item()
    generator = torch.Generator().manual_seed(0)
    samples = torch.multinomial(p, 200_000, replacement=True, generator=generator)
    logprobs, ref_logprobs = p.log()[samples], ref.log()[samples]
    for name in ("k1", "k3"):
        estimate = kl_penalty(logprobs, ref_logprobs, name).mean().item()
        assert estimate == pytest.approx(true_kl, abs=3e-3), name
    # k2 is biased: its mean is a different number.
    assert abs(kl_penalty(logprobs, ref_logprobs, "k2").mean().item() - true_kl) > 1e-2


def test_mask_and_clamp():
    logprobs = torch.tensor([[-1.0, float("nan")], [-1000.0, -1.0]], requires_grad=True)
    ref_logprobs = torch.tensor([[-1.5, -1.0], [-1.0, -1.0]])
    mask = torch.tensor([[1, 0], [1, 1]])
    for name in KL_ESTIMATORS:
        kl = kl_penalty(logprobs, ref_logprobs, name, action_mask=mask)
        assert kl[0, 1].item() == 0.0
        (grad,) = torch.autograd.grad(kl.sum(), logprobs)
        assert torch.isfinite(grad).all() and grad[0, 1].item() == 0.0
    clamped = kl_penalty(logprobs, ref_logprobs, "k3", action_mask=mask, log_ratio_clamp=20.0)
    # the log-ratio is clamped at 20, and k3's value at 10: one token cannot put exp(20) = 5e8 into the loss
    assert clamped[1, 0].item() == K3_MAX == 10.0
    assert kl_penalty(torch.tensor([-1.0]), torch.tensor([1.0]), "k3").item() == pytest.approx(math.exp(2.0) - 3.0)


def test_a_clamped_k3_token_adds_no_gradient():
    logprobs = torch.tensor([-30.0, -1.0], requires_grad=True)
    kl = kl_penalty(logprobs, torch.tensor([-1.0, -1.5]), "k3")
    (grad,) = torch.autograd.grad(kl.sum(), logprobs)
    assert kl[0].item() == K3_MAX and grad[0].item() == 0.0 and grad[1].item() != 0.0


def test_adaptive_controller_moves_towards_the_target():
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    controller.update(current_kl=7.2, n_steps=256)  # e = 0.2
    assert controller.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))
    up = controller.value
    controller.update(current_kl=600.0, n_steps=256)  # clipped at +0.2
    assert controller.value == pytest.approx(up * (1 + 0.2 * 256 / 10_000))
    high = controller.value
    controller.update(current_kl=4.8, n_steps=256)  # e = -0.2
    assert controller.value == pytest.approx(high * (1 - 0.2 * 256 / 10_000))
    controller.update(current_kl=0.0, n_steps=256)  # clipped at -0.2
    assert controller.value < high * (1 - 0.2 * 256 / 10_000) + 1e-12
    before = controller.value
    controller.update(current_kl=torch.tensor(6.0), n_steps=256)  # on target: unchanged
    assert controller.value == pytest.approx(before)


def test_adaptive_controller_refuses_bad_arguments_and_round_trips():
    for kwargs in ({"target": 0.0}, {"target": -1.0}, {"horizon": 0}, {"init_kl_coef": 0.0}):
        with pytest.raises(ConfigError):
            AdaptiveKLController(**{"init_kl_coef": 0.1, "target": 6.0, "horizon": 10_000, **kwargs})
    controller = AdaptiveKLController(0.1, 6.0, 10_000)
    controller.update(12.0, 1000)
    restored = AdaptiveKLController(0.1, 6.0, 10_000)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == controller.value


def test_fixed_controller():
    controller = FixedKLController(0.05)
    controller.update(100.0, 1000)
    assert controller.value == 0.05
    restored = FixedKLController(0.0)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == 0.05
    with pytest.raises(ConfigError):
        FixedKLController(-0.1)


def test_exact_kl_matches_the_definition_and_masks():
    from rlhf.algos.kl import exact_kl

    torch.manual_seed(0)
    logits, ref = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    p, q = logits.softmax(-1), ref.softmax(-1)
    expected = (p * (p.log() - q.log())).sum(-1)
    assert torch.allclose(exact_kl(logits, ref), expected, atol=1e-6)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.allclose(exact_kl(logits, ref, mask), expected * mask, atol=1e-6)
    assert torch.all(exact_kl(logits, logits) == 0)
    # hand-worked: p = (1/2, 1/2), q = (1/4, 3/4): KL = 0.5 ln 2 + 0.5 ln(2/3)
    two = exact_kl(torch.log(torch.tensor([[[0.5, 0.5]]])), torch.log(torch.tensor([[[0.25, 0.75]]])))
    assert two.item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), abs=1e-6)
