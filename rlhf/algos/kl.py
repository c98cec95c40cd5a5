"""KL divergence to the reference policy: per-token estimators and the controllers of its coefficient."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from rlhf.algos.aggregation import check_same_shape
from rlhf.errors import ConfigError
from rlhf.registry import Registry

# Estimators of KL(pi || pi_ref) from a token y ~ pi, written in the log-ratio log_ratio = log pi(y) - log pi_ref(y).
# Source for all three: J. Schulman, "Approximating KL Divergence" (2020), http://joschu.net/blog/kl-approx.html,
# with r = pi_ref(y) / pi(y) = exp(-log_ratio).
KLEstimator = Callable[[Tensor, float], Tensor]
KL_ESTIMATORS: Registry[KLEstimator] = Registry("KL estimator")
K3_MAX = 10.0
"""Largest per-token value of k3 (veRL clamps its low-variance KL to +-10 for the same reason)."""


@KL_ESTIMATORS.register("k1")
def k1(log_ratio: Tensor, log_ratio_clamp: float = 20.0) -> Tensor:
    """k1 = log pi(y) - log pi_ref(y) = -log r. Unbiased, high variance, can be negative.

    The per-token penalty of Ziegler et al. 2019 and InstructGPT (arXiv:2203.02155, eq. 2).
    """
    return log_ratio


@KL_ESTIMATORS.register("k2")
def k2(log_ratio: Tensor, log_ratio_clamp: float = 20.0) -> Tensor:
    """k2 = 0.5 * (log pi(y) - log pi_ref(y))^2 = 0.5 (log r)^2. Biased, low variance, >= 0."""
    return 0.5 * log_ratio**2


@KL_ESTIMATORS.register("k3")
def k3(log_ratio: Tensor, log_ratio_clamp: float = 20.0) -> Tensor:
    """k3 = (r - 1) - log r = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1. Unbiased, low variance, >= 0.

    GRPO's KL term (DeepSeekMath, arXiv:2402.03300, eq. 4). The log-ratio is clamped to +-log_ratio_clamp before
    the exponential so that a token the reference finds far likelier cannot overflow, and the value to
    [0, K3_MAX] (as veRL's low_var_kl): at the log-ratio clamp exp(20) would still put 5e8 into the loss from one
    token. A clamped token adds no gradient.
    """
    neg_log_ratio = (-log_ratio).clamp(-log_ratio_clamp, log_ratio_clamp)
    # expm1 keeps precision for ratios near 1, where exp(x) - 1 - x cancels; the clamp removes what rounding is left.
    return (torch.expm1(neg_log_ratio) - neg_log_ratio).clamp(0.0, K3_MAX)


def kl_penalty(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    estimator: str = "k1",
    action_mask: Optional[Tensor] = None,
    log_ratio_clamp: float = 20.0,
) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) at the sampled tokens, [B, T]; ``estimator`` names one of
    ``KL_ESTIMATORS`` (k1 | k2 | k3, Schulman 2020). Positions where ``action_mask`` is 0 are 0.

    Estimators differ in gradient as well as value: used as a loss term (GRPO), each gives a different gradient;
    used as a reward (PPO, ``kl_shaped_rewards``), they are computed without gradient.
    """
    check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    log_ratio = logprobs - ref_logprobs
    if action_mask is None:
        return KL_ESTIMATORS.get(estimator)(log_ratio, log_ratio_clamp)
    check_same_shape(logprobs=logprobs, action_mask=action_mask)
    # Padding is zeroed before the estimator too: a NaN there would otherwise reach the gradient as 0 * NaN.
    zero = torch.zeros((), dtype=log_ratio.dtype, device=log_ratio.device)
    kl = KL_ESTIMATORS.get(estimator)(torch.where(action_mask != 0, log_ratio, zero), log_ratio_clamp)
    return torch.where(action_mask != 0, kl, zero)


def exact_kl(logits: Tensor, ref_logits: Tensor, action_mask: Optional[Tensor] = None) -> Tensor:
    """KL(pi || pi_ref) at every position over the whole vocabulary, [B, T] from logits [B, T, V]:

        KL_t = sum_v pi(v | s_t) * (log pi(v | s_t) - log pi_ref(v | s_t))

    Exact (no sampling), >= 0, and deterministic along a given response, so checkpoints can be compared on the
    same greedy answers. Computed in float32; positions where ``action_mask`` is 0 are 0.
    """
    check_same_shape(logits=logits, ref_logits=ref_logits)
    logp = torch.log_softmax(logits.float(), dim=-1)
    ref_logp = torch.log_softmax(ref_logits.float(), dim=-1)
    kl = (logp.exp() * (logp - ref_logp)).sum(-1).clamp_min(0.0)
    if action_mask is not None:
        check_same_shape(kl=kl, action_mask=action_mask)
        kl = kl * (action_mask != 0)
    return kl


class FixedKLController:
    """A constant KL coefficient beta (Ziegler et al. 2019, arXiv:1909.08593, Sec. 2.2, the non-adaptive case)."""

    def __init__(self, kl_coef: float):
        if kl_coef < 0:
            raise ConfigError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to do: the coefficient is fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """A KL coefficient beta steered so that the measured KL approaches a target.

    e_t  = clip(KL_t / KL_target - 1, -0.2, 0.2)
    beta <- beta * (1 + K_beta * e_t),   K_beta = n_steps / horizon

    Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences" (arXiv:1909.08593, Sec. 2.2, eq. 2).
    ``n_steps`` is counted in the unit of ``horizon`` (the paper and its code: samples, i.e. episodes, since the
    last update).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if init_kl_coef <= 0:
            raise ConfigError(f"init_kl_coef must be > 0 for an adaptive KL coefficient, got {init_kl_coef}")
        if target <= 0:
            raise ConfigError(f"the adaptive KL target must be > 0, got {target}")
        if horizon <= 0:
            raise ConfigError(f"the adaptive KL horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
