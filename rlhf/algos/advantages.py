"""Advantages: GAE with a critic (PPO), and critic-free estimators over groups of sampled responses (GRPO & co.).

Group layout: the N = P * G rewards of P prompts with G samples each come group by group,
``rewards[g * G:(g + 1) * G]`` being the samples of prompt g (``prompts.repeat_interleave(G)`` order).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from rlhf.algos.aggregation import Reducer, check_same_shape, masked_moments
from rlhf.errors import ConfigError
from rlhf.registry import Registry


STD_EPS = 1e-4
"""Added to a reward std before dividing by it (TRL's value). With near-equal continuous rewards (std 1e-5, a
reward model's scores of near-identical answers) 1e-6 would blow their differences up to advantages of about 1;
1e-4 keeps them small."""


@torch.no_grad()
def gae(
    rewards: Tensor,
    values: Tensor,
    action_mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    bootstrap_values: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation over the real tokens of each row; returns (advantages, returns), [B, T].

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = sum_{k >= 0} (gamma * lam)^k delta_{t+k}      (recursively A_t = delta_t + gamma * lam * A_{t+1})
    R_t     = A_t + V_t                                     (the critic's regression target)

    Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation"
    (arXiv:1506.02438, eq. 16); R_t as in PPO (arXiv:1707.06347, Sec. 5).

    The recursion runs over the real tokens of a row only (``action_mask != 0``): padding, before or after the
    response, is never read, so NaN or stale values there cannot leak in. After the last real token the episode
    has ended, so V_{t+1} = 0 there, unless ``bootstrap_values`` [B] is given: then V_{t+1} = bootstrap_values[b],
    the critic's estimate for a response cut off by the length limit (pass 0 for rows that ended). A mask with
    zeros inside a row (e.g. tool output in a multi-turn rollout) is also supported: those positions are skipped
    as if absent, and time does not advance across them. Masked positions of both outputs are 0.
    Computed without gradient: advantages and returns are targets, not functions of the parameters.
    """
    check_same_shape(rewards=rewards, values=values, action_mask=action_mask)
    dtype = torch.promote_types(values.dtype, torch.float32)
    rewards, values = rewards.to(dtype), values.to(dtype)
    real = action_mask != 0
    batch, length = values.shape
    next_value = torch.zeros(batch, dtype=dtype, device=values.device)
    if bootstrap_values is not None:
        if bootstrap_values.shape != (batch,):
            raise ValueError(f"bootstrap_values must be [B] = [{batch}], got {list(bootstrap_values.shape)}")
        next_value = bootstrap_values.to(dtype).clone()
    next_advantage = torch.zeros(batch, dtype=dtype, device=values.device)
    advantages = torch.zeros_like(values)
    for t in reversed(range(length)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(real[:, t], advantage, 0.0)
        next_value = torch.where(real[:, t], values[:, t], next_value)
        next_advantage = torch.where(real[:, t], advantage, next_advantage)
    returns = torch.where(real, advantages + values, 0.0)
    return advantages, returns


def _grouped(rewards: Tensor, group_size: int, estimator: str, min_group_size: int = 2) -> Tensor:
    """Check the group layout and return the rewards as [N / G, G] (float)."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be one per sample, [N], got {list(rewards.shape)}")
    if group_size < min_group_size:
        raise ConfigError(
            f"group_size={group_size} is too small for {estimator!r} advantages: they compare samples of the same "
            f"prompt, so each prompt needs at least {min_group_size} samples. Set group_size >= {min_group_size}."
        )
    if rewards.numel() % group_size != 0:
        raise ConfigError(
            f"{rewards.numel()} rewards do not split into groups of group_size={group_size}: the number of samples "
            "must be a multiple of group_size (each prompt sampled group_size times)."
        )
    if not rewards.is_floating_point():
        rewards = rewards.float()
    return rewards.reshape(-1, group_size)


def _std(x: Tensor, dim: Optional[int] = None, keepdim: bool = False) -> Tensor:
    """Sample standard deviation (Bessel-corrected, like torch.std); 0 for a single element."""
    n = x.numel() if dim is None else x.shape[dim]
    if n < 2:
        return torch.zeros_like(x.sum() if dim is None else x.sum(dim, keepdim=keepdim))
    return x.std() if dim is None else x.std(dim, keepdim=keepdim)


def _batch_std(x: Tensor, reduce: Optional[Reducer]) -> Tensor:
    """Sample std of every entry of x, over all processes when `reduce` sums over them."""
    return masked_moments(x, torch.ones_like(x, dtype=torch.bool), reduce)[1].sqrt()


def _divide_by_reward_std(centred: Tensor, grouped: Tensor, scale: str, eps: float, estimator: str,
                          reduce: Optional[Reducer] = None) -> Tensor:
    """centred [P, G] / (std + eps), the std of the group's rewards ("group"), of all rewards ("batch", over
    every process with `reduce`), or 1."""
    if scale == "group":
        return centred / (_std(grouped, dim=-1, keepdim=True) + eps)
    if scale == "batch":
        return centred / (_batch_std(grouped, reduce) + eps)
    if scale == "none":
        return centred
    raise ConfigError(f"unknown scale {scale!r} for {estimator!r} advantages. Valid: group, batch, none.")


# An advantage estimator maps sequence rewards [N] and group_size to advantages [N]; keywords: scale, eps, and
# reduce (sums over processes, so batch-wide statistics are those of the global batch).
AdvantageEstimator = Callable[..., Tensor]
ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")


@ADVANTAGE_ESTIMATORS.register("grpo")
def group_advantages(rewards: Tensor, group_size: int, scale: Optional[str] = "group", eps: float = STD_EPS,
                     reduce: Optional[Reducer] = None) -> Tensor:
    """A_i = (r_i - mean(r_group)) / (std + eps), rewards [N] -> advantages [N], one per sample.

    GRPO outcome supervision (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, Sec. 4.1.2).
    ``scale`` chooses the std:
      "group": the std of the sample's group (GRPO);
      "batch": the std of all N rewards of the batch, one number for every group (as TRL's scale_rewards="batch";
               REINFORCE++, arXiv:2501.03262, argues per-group scaling is biased);
      "none":  no division, A_i = r_i - mean(r_group) (Dr. GRPO, arXiv:2503.20783: the std favours questions that
               are too easy or too hard).
    The std is Bessel-corrected (torch.std). A group whose rewards are all equal gets advantages 0 (not NaN).
    ``scale=None`` means "group".
    """
    grouped = _grouped(rewards, group_size, "grpo")
    centred = grouped - grouped.mean(-1, keepdim=True)
    return _divide_by_reward_std(centred, grouped, scale or "group", eps, "grpo", reduce).view(-1)


@ADVANTAGE_ESTIMATORS.register("rloo")
def rloo_advantages(rewards: Tensor, group_size: int, scale: Optional[str] = "none", eps: float = STD_EPS,
                    reduce: Optional[Reducer] = None) -> Tensor:
    """A_i = r_i - (1 / (G - 1)) sum_{j != i} r_j: the mean reward of the other samples of the prompt as baseline.

    REINFORCE Leave-One-Out: Kool et al. 2019 ("Buy 4 REINFORCE Samples, Get a Baseline for Free!"); Ahmadian et
    al. 2024 ("Back to Basics", arXiv:2402.14740). Equals G / (G - 1) * (r_i - mean(r_group)).
    ``scale``: "none" (the paper; default), or "group" / "batch" to divide by a reward std as in ``group_advantages``.
    """
    grouped = _grouped(rewards, group_size, "rloo")
    baseline = (grouped.sum(-1, keepdim=True) - grouped) / (group_size - 1)
    return _divide_by_reward_std(grouped - baseline, grouped, scale or "none", eps, "rloo", reduce).view(-1)


@ADVANTAGE_ESTIMATORS.register("reinforce_pp")
def reinforce_pp_advantages(
    rewards: Tensor, group_size: int = 1, scale: Optional[str] = "batch", eps: float = STD_EPS,
    reduce: Optional[Reducer] = None,
) -> Tensor:
    """REINFORCE++ with global advantage normalisation (Hu et al. 2025, arXiv:2501.03262), sequence rewards [N].

    A_i      = r_i - mean(r_group)        with group_size > 1 ("REINFORCE++ w/ baseline"), or
    A_i      = r_i                        with group_size = 1 (plain REINFORCE++, one sample per prompt)
    A_i_norm = (A_i - mean_batch(A)) / (std_batch(A) + eps)      (scale="batch", the default)

    The normalising std is that of the centred advantages over the whole batch, not of the raw rewards (this is
    what distinguishes it from ``group_advantages(scale="batch")``). ``scale="none"`` skips the normalisation.
    This is the outcome-reward form, one advantage per sequence. The paper's token-level form, with the KL penalty
    folded into per-token rewards, composes from the other functions:
    ``kl_shaped_rewards`` -> ``gae(values=0, gamma=1, lam=1)`` (reward-to-go) -> ``masked_whiten`` over the batch.
    """
    grouped = _grouped(rewards, group_size, "reinforce_pp", min_group_size=1)
    centred = grouped - grouped.mean(-1, keepdim=True) if group_size > 1 else grouped
    scale = scale or "batch"
    if scale == "batch":
        mean, var = masked_moments(centred, torch.ones_like(centred, dtype=torch.bool), reduce)
        centred = (centred - mean) / (var.sqrt() + eps)
    elif scale != "none":
        raise ConfigError(f"unknown scale {scale!r} for 'reinforce_pp' advantages. Valid: batch, none.")
    return centred.view(-1)


def zero_variance_groups(rewards: Tensor, group_size: int, tol: float = 1e-6) -> Tensor:
    """Groups whose rewards are all (nearly) equal, [N] -> bool [N / G]: std(r_group) <= tol.

    Such groups get zero advantage under every group estimator and so no policy gradient; DAPO's dynamic
    sampling (arXiv:2503.14476, "Dynamic Sampling") drops them and samples more. Works for continuous rewards too.
    """
    grouped = _grouped(rewards, group_size, "zero-variance")
    return _std(grouped, dim=-1) <= tol
