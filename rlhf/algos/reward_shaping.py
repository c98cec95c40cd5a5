"""From one score per response to per-token rewards for PPO: where the score goes, and the KL penalty."""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf.algos.aggregation import check_same_shape


def place_sequence_rewards(scores: Tensor, action_mask: Tensor) -> Tensor:
    """Per-token rewards [B, T] holding each row's score [B] on its last real response token, 0 elsewhere.

    The score of a whole response is earned by its last action (InstructGPT, arXiv:2203.02155, Sec. 3.5; Ziegler
    et al. 2019, arXiv:1909.08593). The position is read from ``action_mask``, so it is never a padding token,
    whichever side the padding is on. A row with no response token gets no reward (there is no action to credit).
    """
    if scores.dim() != 1 or action_mask.dim() != 2 or scores.shape[0] != action_mask.shape[0]:
        raise ValueError(
            f"scores must be [B] and action_mask [B, T], got {list(scores.shape)} and {list(action_mask.shape)}"
        )
    real = action_mask != 0
    positions = torch.arange(real.shape[1], device=real.device)
    last = torch.where(real, positions, -1).amax(-1)
    at_last = (positions == last[:, None]) & real
    dtype = torch.promote_types(scores.dtype, torch.float32)
    return torch.where(at_last, scores.to(dtype)[:, None], torch.zeros((), dtype=dtype, device=scores.device))


def kl_shaped_rewards(scores: Tensor, kl: Tensor, kl_coef: float, action_mask: Tensor) -> Tensor:
    """r_t = -beta * KL_t + [t is the last response token] * r(x, y), per token [B, T].

    The KL-penalised reward of Ziegler et al. 2019 (arXiv:1909.08593, Sec. 2.2: R = r - beta log(pi / rho))
    and InstructGPT (arXiv:2203.02155, eq. 2), spread over tokens: ``kl`` [B, T] is the per-token estimate from
    ``kl_penalty`` (k1 in those papers), ``kl_coef`` is beta, ``scores`` [B] the reward model's or verifier's
    score. Masked positions are 0.
    """
    check_same_shape(kl=kl, action_mask=action_mask)
    penalty = torch.where(action_mask != 0, -kl_coef * kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    return penalty + place_sequence_rewards(scores, action_mask)


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13), per response [B]:

        R(y) = 0                                    if |y| <= L_max - L_cache
             = penalty * ((L_max - L_cache) - |y|) / L_cache   if L_max - L_cache < |y| <= L_max
             = -penalty                             if |y| > L_max

    ``lengths`` are response lengths in tokens, ``max_len`` is L_max (rollout.max_new_tokens), ``buffer`` L_cache.
    Added to the task reward, it tells the policy that a response running into the limit is worse, gradually,
    instead of cutting its reward off at the limit.
    """
    if buffer <= 0 or buffer > max_len:
        raise ValueError(f"the overlong buffer must be in 1..{max_len} (the length limit), got {buffer}")
    lengths = lengths.to(torch.promote_types(lengths.dtype, torch.float32))
    soft = (max_len - buffer - lengths) / buffer
    return penalty * torch.where(lengths > max_len, torch.full_like(lengths, -1.0), soft.clamp(max=0.0))


def cut_response_scores(scores: Tensor, truncated: Tensor, last_values: Tensor, truncation: str = "terminal"
                        ) -> tuple[Tensor, Tensor]:
    """How a response cut off by the length limit enters GAE: (scores [B], bootstrap values [B] for ``gae``).

    "terminal" (TRL, veRL and OpenRLHF): the cut is the end of the episode. The score sits on the last generated
    token and the value after it is 0, as for a response that ended with EOS.
    "bootstrap": the episode goes on past the cut. A cut response has no score (the score of an unfinished answer
    is not its return); its return continues with ``last_values``, the critic's V(s_T) after its last token.

    Never both: a score at the cut plus gamma * V(s_T) on top counts the rest of the episode twice. ``scores``,
    ``truncated`` (bool) and ``last_values`` are [B]; rows that ended with EOS are terminal under either choice.
    """
    if truncation == "terminal":
        return scores, torch.zeros_like(last_values)
    if truncation == "bootstrap":
        zero = torch.zeros((), dtype=scores.dtype, device=scores.device)
        return torch.where(truncated, zero, scores), torch.where(truncated, last_values, torch.zeros_like(last_values))
    raise ValueError(f"unknown truncation {truncation!r}: terminal or bootstrap")
