"""Reward-model losses and metrics: Bradley-Terry pairs, Plackett-Luce rankings, where a sequence's score is read."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf.algos.aggregation import check_same_shape, masked_sum
from rlhf.errors import ConfigError
from rlhf.registry import Registry

REDUCTIONS = ("mean", "sum", "none")


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ConfigError(f"unknown reduction {reduction!r}. Valid: {', '.join(REDUCTIONS)}.")


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: Optional[Tensor | float] = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    """Negative log-likelihood of "chosen beats rejected" under the Bradley-Terry model.

    d = r(x, y_c) - r(x, y_r) - m
    L = -(1 - eps) log sigma(d) - eps log sigma(-d)

    Bradley & Terry (1952); as a reward-model loss: Ouyang et al. 2022 (InstructGPT, arXiv:2203.02155, eq. 1).
    ``margin`` m (a number or one per pair): Llama 2 (Touvron et al. 2023, arXiv:2307.09288, eq. 2), the pair must
    be won by at least m. ``label_smoothing`` eps: the preference label is flipped with probability eps (label
    smoothing, Szegedy et al. 2016; the same form as conservative DPO). eps = 0 and m = 0 give -log sigma(d), and
    d = 0 gives log 2. ``reduction``: "mean" | "sum" | "none" (one loss per pair).
    """
    check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff)
    if label_smoothing > 0:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-diff)
    return _reduce(loss, reduction)


def listwise_loss(scores: Tensor, mask: Optional[Tensor] = None, reduction: str = "mean") -> Tensor:
    """Negative log-likelihood of a ranking under the Plackett-Luce model, scores [N, K] ordered best first.

    L = -sum_{k=1}^{K} [ s_k - log sum_{j=k}^{K} exp(s_j) ]

    Plackett (1975), Luce (1959); as a reward-model loss for K-wise comparisons: Zhu, Jordan & Jiao 2023
    (arXiv:2301.11270). The last term is always 0, and K = 2 is exactly ``bradley_terry_loss``. ``mask`` [N, K]
    marks the real candidates of ragged lists; they must come first in each row (a prefix) and number at least 2.
    ``reduction``: "mean" | "sum" | "none" (one loss per list).
    """
    scores, valid = _ranked_lists(scores, mask, prefix=True)
    # suffix[n, k, j]: candidate j is real and still unplaced when place k is filled (j >= k). The diagonal is
    # always in, so the rows of padded places stay finite (their terms are masked out below).
    num = scores.shape[1]
    later = torch.ones(num, num, dtype=torch.bool, device=scores.device).triu()
    diagonal = torch.eye(num, dtype=torch.bool, device=scores.device)
    suffix = (later & valid[:, None, :]) | diagonal
    neg_inf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
    log_normaliser = torch.where(suffix, scores[:, None, :], neg_inf).logsumexp(-1)
    loss = -masked_sum(scores - log_normaliser, valid, dim=-1)
    return _reduce(loss, reduction)


def _ranked_lists(scores: Tensor, mask: Optional[Tensor], prefix: bool = False) -> tuple[Tensor, Tensor]:
    """Check lists [N, K] ranked best first (at least 2 real candidates each; with `prefix`, real ones first) and
    return the scores with padded candidates zeroed, and the boolean mask of real ones."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be [N, K] ranked best first, got {list(scores.shape)}")
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    check_same_shape(scores=scores, mask=mask)
    valid = mask != 0
    if prefix and ((valid[:, 1:] & ~valid[:, :-1]).any() or (valid.sum(-1) < 2).any()):
        raise ValueError("each row of the listwise mask must be a prefix of at least 2 real candidates")
    if (valid.sum(-1) < 2).any():
        raise ValueError("every ranked list needs at least 2 real candidates")
    return torch.where(valid, scores, torch.zeros((), dtype=scores.dtype, device=scores.device)), valid


def _ordered_pairs(scores: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Scores with padded candidates zeroed (NaN there stays harmless), and pairs[n, j, k]: j ranked above k,
    both real, for lists [N, K] ordered best first."""
    scores, valid = _ranked_lists(scores, mask)
    num = scores.shape[1]
    earlier = torch.ones(num, num, dtype=torch.bool, device=scores.device).triu(1)
    return scores, earlier & valid[:, :, None] & valid[:, None, :]


def _mean_over_pairs(per_pair: Tensor, pairs: Tensor) -> Tensor:
    return masked_sum(per_pair, pairs, dim=(1, 2)) / pairs.sum((1, 2)).to(per_pair.dtype)


def pairwise_ranking_loss(
    scores: Tensor,
    mask: Optional[Tensor] = None,
    margin: Optional[Tensor | float] = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    """Bradley-Terry over every ordered pair of a ranking, scores [N, K] ordered best first.

    L = 1 / C(K, 2) * sum_{j < k} BT(s_j, s_k, m)       (BT = ``bradley_terry_loss`` of one pair)

    InstructGPT (Ouyang et al. 2022, arXiv:2203.02155, eq. 1): all C(K, 2) comparisons of a prompt's K ranked
    responses, averaged, so each prompt weighs the same whatever its K. K = 2 is exactly ``bradley_terry_loss``.
    ``margin``: a number or one per list [N], applied to each of the list's pairs. ``mask`` [N, K] marks the real
    candidates of ragged lists (at least 2 per row). ``reduction``: "mean" | "sum" | "none" (one loss per list).
    """
    scores, pairs = _ordered_pairs(scores, mask)
    if isinstance(margin, Tensor):
        if margin.shape != scores.shape[:1]:
            raise ValueError(f"margin must be one number per list [{scores.shape[0]}], got {list(margin.shape)}")
        margin = margin[:, None, None]
    better, worse = torch.broadcast_tensors(scores[:, :, None], scores[:, None, :])
    per_pair = bradley_terry_loss(better, worse, margin, label_smoothing, reduction="none")
    return _reduce(_mean_over_pairs(per_pair, pairs), reduction)


def ranking_centering_loss(scores: Tensor, mask: Optional[Tensor], coef: float, reduction: str = "mean") -> Tensor:
    """``centering_loss`` averaged over the ordered pairs of each ranked list [N, K]:
    L = coef / C(K, 2) * sum_{j < k} (s_j + s_k)^2. K = 2 is exactly ``centering_loss``."""
    scores, pairs = _ordered_pairs(scores, mask)
    per_pair = coef * (scores[:, :, None] + scores[:, None, :]) ** 2
    return _reduce(_mean_over_pairs(per_pair, pairs), reduction)


def centering_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, coef: float, reduction: str = "mean") -> Tensor:
    """L = coef * (r(x, y_c) + r(x, y_r))^2: keeps rewards centred on zero (Bradley-Terry is shift-invariant).

    Eisenstein et al. 2023, "Helping or Herding? Reward Model Ensembles Mitigate but do not Eliminate Reward
    Hacking" (arXiv:2312.09244); added to ``bradley_terry_loss``.
    """
    check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    return _reduce(coef * (chosen_rewards + rejected_rewards) ** 2, reduction)


def dense_scores(token_rewards: Tensor, mask: Tensor) -> Tensor:
    """r(x, y) = sum_t m_t r_t: a sequence's score as the sum of per-token rewards [B, T] -> [B].

    Christiano et al. 2017 (arXiv:1706.03741, Sec. 2.2.3, eq. 1): a segment's preference probability uses the sum
    of the predicted per-step rewards.
    """
    return masked_sum(token_rewards, mask, dim=-1)


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of each row's last real token, [B, T] -> [B] (long), for left or right padding alike.

    Read from the mask, never from token ids (a pad id may equal the EOS id). A reward model's score for a
    sequence is its head's output at this position (InstructGPT; the last token has seen the whole sequence).
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [B, T], got {list(attention_mask.shape)}")
    real = attention_mask != 0
    if not real.any(-1).all():
        empty = (~real.any(-1)).nonzero().flatten().tolist()
        raise ValueError(f"rows {empty} of the attention mask hold no real token")
    positions = torch.arange(real.shape[1], device=real.device)
    return torch.where(real, positions, -1).amax(-1)


def pairwise_accuracy(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """Fraction of pairs with r(x, y_c) > r(x, y_r); ties count as wrong."""
    check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    return (chosen_rewards > rejected_rewards).float().mean()


def ranking_auc(positive: Tensor, negative: Tensor) -> Tensor:
    """P(score of a random positive > score of a random negative), ties counting half: the Mann-Whitney AUC of a
    score separating two sets (a reward model's scores of a policy's right answers against its wrong ones), whatever
    the score's scale or offset. nan when either set is empty."""
    if positive.numel() == 0 or negative.numel() == 0:
        return torch.tensor(float("nan"))
    diff = positive.reshape(-1, 1).double() - negative.reshape(1, -1).double()
    return (diff > 0).double().mean() + 0.5 * (diff == 0).double().mean()


def ranking_accuracy(scores: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Fraction of ordered pairs (j better than k, both real) with s_j > s_k, over all lists [N, K] (best first).

    K = 2 is ``pairwise_accuracy``. Ties count as wrong.
    """
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    check_same_shape(scores=scores, mask=mask)
    valid = mask != 0
    num = scores.shape[1]
    earlier = torch.ones(num, num, dtype=torch.bool, device=scores.device).triu(1)
    pairs = earlier & valid[:, :, None] & valid[:, None, :]
    correct = (scores[:, :, None] > scores[:, None, :]) & pairs
    return correct.sum() / pairs.sum().clamp_min(1)


# The losses `rm.loss` names; each maps scores [N, K] (best first) and a mask to one loss per list.
RM_LOSSES: Registry = Registry("reward-model loss")
RM_LOSSES.register("pairwise")(pairwise_ranking_loss)
RM_LOSSES.register("listwise")(listwise_loss)
