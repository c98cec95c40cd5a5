"""Direct preference optimisation and its relatives: per-pair losses from summed sequence log-probs, no reward model.

Inputs are log pi(y | x) summed over each response's tokens, [B] per role (policy/reference x chosen/rejected).
Losses return one value per pair (the caller averages). Computed in float32 (float64 stays float64); the reference
log-probs are detached, so the gradient reaches the policy only.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf.algos.aggregation import check_same_shape
from rlhf.errors import ConfigError
from rlhf.registry import Registry

# Each maps (policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta, label_smoothing) to a loss per pair.
DPOLoss = Callable[..., Tensor]
DPO_LOSSES: Registry[DPOLoss] = Registry("DPO loss")


def _float(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _check(beta: float, label_smoothing: float, smoothing_used: bool = True) -> None:
    if not beta > 0:  # also refuses NaN
        raise ConfigError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and not smoothing_used:
        raise ConfigError(f"label_smoothing={label_smoothing} has no effect on this loss; use sigmoid or robust")


def log_ratio_margin(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor
) -> Tensor:
    """h = [log pi(y_c) - log pi_ref(y_c)] - [log pi(y_r) - log pi_ref(y_r)], reference terms detached."""
    check_same_shape(policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                     ref_chosen=ref_chosen, ref_rejected=ref_rejected)
    chosen = _float(policy_chosen) - _float(ref_chosen.detach())
    return chosen - (_float(policy_rejected) - _float(ref_rejected.detach()))


def _smoothed_sigmoid(logits: Tensor, label_smoothing: float) -> Tensor:
    """-(1 - eps) log sigma(z) - eps log sigma(-z)."""
    loss = -F.logsigmoid(logits)
    if label_smoothing > 0:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss


@DPO_LOSSES.register("sigmoid")
def sigmoid_loss(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *,
    beta: float, label_smoothing: float = 0.0,
) -> Tensor:
    """L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h), h from ``log_ratio_margin``.

    DPO: Rafailov et al. 2023 (arXiv:2305.18290, eq. 7), eps = 0. eps > 0: conservative DPO (E. Mitchell, "A note on
    DPO with noisy preferences", 2023; TRL's cDPO), the label taken as flipped with probability eps. h = 0 gives log 2.
    """
    _check(beta, label_smoothing)
    return _smoothed_sigmoid(beta * log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected),
                             label_smoothing)


@DPO_LOSSES.register("robust")
def robust_loss(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *,
    beta: float, label_smoothing: float = 0.0,
) -> Tensor:
    """L = [-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)] / (1 - 2 eps).

    Robust DPO: Chowdhury et al. 2024 (arXiv:2403.00409). Unbiased under labels flipped with probability eps:
    (1 - eps) L(h) + eps L(-h) = -log sigma(beta h), the clean DPO loss. eps = 0 is DPO; eps -> 0.5 diverges.
    """
    _check(beta, label_smoothing)
    logits = beta * log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)


@DPO_LOSSES.register("hinge")
def hinge_loss(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *,
    beta: float, label_smoothing: float = 0.0,
) -> Tensor:
    """L = max(0, 1 - beta h): SLiC's calibration loss (Zhao et al. 2023, arXiv:2305.10425) on the log-ratio
    margin h, as in RSO (Liu et al. 2023, arXiv:2309.06657). Zero once h >= 1 / beta. No label smoothing."""
    _check(beta, label_smoothing, smoothing_used=False)
    return F.relu(1 - beta * log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected))


@DPO_LOSSES.register("ipo")
def ipo_loss(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *,
    beta: float, label_smoothing: float = 0.0,
) -> Tensor:
    """L = (h - 1 / (2 beta))^2: IPO, Azar et al. 2023 (arXiv:2310.12036, eq. 17, beta = their tau).

    A regression of h onto 1 / (2 beta), so h stays bounded where DPO's -log sigma pushes it to infinity. The paper
    states it for whole-sequence log-probs (pass sums); TRL passes log-probs averaged over each response's tokens
    (sum / length) for IPO, which changes the scale 1 / (2 beta) is measured in: choose by what you pass. No label
    smoothing.
    """
    _check(beta, label_smoothing, smoothing_used=False)
    return (log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected) - 1 / (2 * beta)) ** 2


def simpo_loss(
    policy_chosen: Tensor, policy_rejected: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor, *,
    beta: float, gamma_beta_ratio: float = 0.5, label_smoothing: float = 0.0,
) -> Tensor:
    """L = -log sigma(beta (log pi(y_c) / |y_c| - log pi(y_r) / |y_r|) - gamma),  gamma = gamma_beta_ratio * beta.

    SimPO: Meng, Xia & Chen 2024 (arXiv:2405.14734, eq. 6): reference-free, the length-averaged log-prob as the
    implicit reward and a target margin gamma. gamma_beta_ratio is the authors' code's parameter (TRL's CPOTrainer
    takes gamma itself, ``simpo_gamma``). ``label_smoothing`` eps as in ``sigmoid_loss``. Lengths: tokens per
    response, [B], > 0.
    """
    _check(beta, label_smoothing)
    if not gamma_beta_ratio >= 0:
        raise ConfigError(f"gamma_beta_ratio must be >= 0, got {gamma_beta_ratio}")
    check_same_shape(policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                     chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    if (chosen_lengths <= 0).any() or (rejected_lengths <= 0).any():
        raise ValueError("SimPO needs every response length > 0 (an empty response has no average log-prob)")
    chosen, rejected = _float(policy_chosen), _float(policy_rejected)
    chosen, rejected = chosen / chosen_lengths.to(chosen.dtype), rejected / rejected_lengths.to(rejected.dtype)
    return _smoothed_sigmoid(beta * (chosen - rejected) - gamma_beta_ratio * beta, label_smoothing)


def implicit_rewards(policy_logps: Tensor, ref_logps: Tensor, beta: float) -> Tensor:
    """r(x, y) = beta (log pi(y | x) - log pi_ref(y | x)): DPO's implicit reward (arXiv:2305.18290, Sec. 4),
    up to the prompt's log-partition, which cancels between two responses to the same prompt."""
    _check(beta, 0.0)
    check_same_shape(policy_logps=policy_logps, ref_logps=ref_logps)
    return beta * (_float(policy_logps) - _float(ref_logps.detach()))


class PreferenceMetrics(NamedTuple):
    """Batch statistics of the implicit rewards, detached 0-dim tensors."""

    chosen: Tensor  # mean r(x, y_c)
    rejected: Tensor  # mean r(x, y_r)
    margin: Tensor  # mean r(x, y_c) - r(x, y_r)
    accuracy: Tensor  # share of pairs with r(x, y_c) > r(x, y_r); ties count as wrong

    def as_log(self) -> dict[str, Tensor]:
        """rewards/chosen, rewards/rejected, rewards/margin, rewards/accuracy (TRL: .../margins, .../accuracies)."""
        return {f"rewards/{name}": value for name, value in self._asdict().items()}


def preference_metrics(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *, beta: float
) -> PreferenceMetrics:
    """Means of the implicit rewards of chosen and rejected responses, their margin, and the pairwise accuracy."""
    chosen = implicit_rewards(policy_chosen.detach(), ref_chosen, beta)
    rejected = implicit_rewards(policy_rejected.detach(), ref_rejected, beta)
    check_same_shape(chosen=chosen, rejected=rejected)
    return PreferenceMetrics(chosen.mean(), rejected.mean(), (chosen - rejected).mean(),
                             (chosen > rejected).to(chosen.dtype).mean())
