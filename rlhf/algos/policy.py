"""Clipped surrogate losses: the PPO policy objective (token or sequence ratios) and the clipped value loss."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from rlhf.algos.aggregation import check_same_shape, masked_mean
from rlhf.errors import ConfigError

RATIO_LEVELS = ("token", "sequence")


def _zero_padding(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask != 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    action_mask: Optional[Tensor] = None,
    eps_low: float = 0.2,
    eps_high: Optional[float] = None,
    dual_clip: Optional[float] = None,
    ratio_level: str = "token",
    log_ratio_clamp: float = 20.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token clipped surrogate loss [B, T] (to be reduced with ``aggregate``) and detached statistics.

    rho_t = pi(y_t) / pi_old(y_t)
    l_t   = max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps_low, 1 + eps_high))

    PPO (Schulman et al. 2017, arXiv:1707.06347, eq. 7), negated to a loss. Separate ``eps_low`` / ``eps_high``
    ("Clip-Higher"): DAPO (arXiv:2503.14476); ``eps_high=None`` means eps_high = eps_low.

    ``dual_clip`` c > 1 (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL",
    arXiv:1912.09729): for A_t < 0 the loss is also bounded, l_t = min(l_t, -A_t * c), so one token whose ratio
    has exploded cannot dominate the step.

    ``ratio_level="sequence"`` is GSPO (Zheng et al. 2025, arXiv:2507.18071): one ratio per sequence,
    s_i = exp(mean_t (log pi(y_it) - log pi_old(y_it))) over its real tokens (the length-normalised sequence
    likelihood ratio), clipped as a whole. It is applied in the GSPO-token form,
    s_it = sg[s_i] * pi(y_it) / sg[pi(y_it)], whose value is s_i at every token and whose gradient flows through
    each token; with a per-sequence advantage and ``seq_mean_token_mean`` aggregation this is exactly GSPO's
    gradient. GSPO's clip ranges are small (the paper uses 3e-4 and 4e-4).

    ``advantages`` are [B] (one per sequence, broadcast over tokens) or [B, T]. Log-ratios are clamped to
    +-``log_ratio_clamp`` before the exponential. Masked positions of the loss are 0. Gradient flows into
    ``logprobs`` only (``old_logprobs`` and ``advantages`` are detached).

    Statistics (0-dim tensors, over real tokens): ``clip_frac_low`` / ``clip_frac_high`` (tokens whose gradient is
    cut by the lower clip, A < 0, or the upper clip, A > 0), ``dual_clip_frac``, ``ratio_mean``, and
    ``approx_kl`` = mean of k3 = rho_t - 1 - log rho_t with the token ratios (at either ratio level), an estimate of
    KL(pi_old || pi) (Schulman 2020).
    """
    check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs)
    if action_mask is None:
        action_mask = torch.ones_like(logprobs, dtype=torch.bool)
    check_same_shape(logprobs=logprobs, action_mask=action_mask)
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logprobs)
    check_same_shape(logprobs=logprobs, advantages=advantages)
    eps_high = eps_low if eps_high is None else eps_high
    if eps_low < 0 or eps_high < 0:
        raise ConfigError(f"clip ranges must be >= 0, got eps_low={eps_low}, eps_high={eps_high}")
    if dual_clip is not None and dual_clip <= 1:
        raise ConfigError(f"dual_clip must be > 1 (a bound on -A * ratio for A < 0), got {dual_clip}")
    if ratio_level not in RATIO_LEVELS:
        raise ConfigError(f"unknown ratio_level {ratio_level!r}. Valid: {', '.join(RATIO_LEVELS)}.")

    # Padding is zeroed first: a NaN there would otherwise reach the gradient through 0 * NaN. Only ``logprobs``
    # carries gradient: old log-probs and advantages are constants of the update.
    logprobs = _zero_padding(logprobs, action_mask)
    old_logprobs = _zero_padding(old_logprobs.detach(), action_mask)
    advantages = _zero_padding(advantages.detach(), action_mask)
    token_log_ratio = (logprobs - old_logprobs).clamp(-log_ratio_clamp, log_ratio_clamp)
    if ratio_level == "token":
        log_ratio = token_log_ratio
    else:
        seq_log_ratio = masked_mean(token_log_ratio, action_mask, dim=-1).clamp(-log_ratio_clamp, log_ratio_clamp)
        log_ratio = seq_log_ratio.detach()[:, None] + logprobs - logprobs.detach()
    ratio = log_ratio.exp()

    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - eps_low, 1 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss = torch.where(advantages < 0, torch.minimum(loss, -advantages * dual_clip), loss)
    loss = _zero_padding(loss, action_mask)

    with torch.no_grad():
        stats = {
            "clip_frac_low": masked_mean(((advantages < 0) & (ratio < 1 - eps_low)).float(), action_mask),
            "clip_frac_high": masked_mean(((advantages > 0) & (ratio > 1 + eps_high)).float(), action_mask),
            "ratio_mean": masked_mean(ratio, action_mask),
            "approx_kl": masked_mean((torch.expm1(token_log_ratio) - token_log_ratio).clamp_min(0.0), action_mask),
        }
        if dual_clip is not None:
            stats["dual_clip_frac"] = masked_mean(((advantages < 0) & (ratio > dual_clip)).float(), action_mask)
    return loss, stats


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    action_mask: Optional[Tensor] = None,
    value_clip: Optional[float] = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token clipped value loss [B, T] and detached statistics.

    V_clip = V_old + clip(V - V_old, -value_clip, value_clip)
    l_t    = 0.5 * max((V - R)^2, (V_clip - R)^2)

    Value clipping from OpenAI baselines' ppo2 (studied in Engstrom et al. 2020, "Implementation Matters in Deep
    Policy Gradients", arXiv:2005.12729, Sec. 3); ``value_clip=None`` gives the plain 0.5 * (V - R)^2 of PPO
    (arXiv:1707.06347, eq. 9). Masked positions are 0. Statistic: ``value_clip_frac``, the share of real tokens
    where the clipped term is the larger one (their gradient is cut). Gradient flows into ``values`` only.
    """
    check_same_shape(values=values, old_values=old_values, returns=returns)
    if action_mask is None:
        action_mask = torch.ones_like(values, dtype=torch.bool)
    check_same_shape(values=values, action_mask=action_mask)
    values = _zero_padding(values, action_mask)
    old_values = _zero_padding(old_values.detach(), action_mask)
    returns = _zero_padding(returns.detach(), action_mask)
    unclipped = (values - returns) ** 2
    if value_clip is None:
        loss = 0.5 * unclipped
        clip_active = torch.zeros_like(unclipped, dtype=torch.bool)
    else:
        if value_clip <= 0:
            raise ConfigError(f"value_clip must be > 0 (or null to disable), got {value_clip}")
        values_clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
        clipped = (values_clipped - returns) ** 2
        loss = 0.5 * torch.maximum(unclipped, clipped)
        clip_active = clipped > unclipped
    with torch.no_grad():
        stats = {"value_clip_frac": masked_mean(clip_active.float(), action_mask)}
    return _zero_padding(loss, action_mask), stats
