"""Masked statistics and the ways a [B, T] token loss becomes one scalar.

A mask has the shape of the values it masks; ``mask[b, t] = 1`` (or True) marks a real token. Masked-out
positions never reach a result, even when they hold NaN or inf (padding logits often do).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

from rlhf.registry import Registry


def check_same_shape(**tensors: Tensor) -> None:
    """Refuse tensors whose shapes differ (a mask must have the shape of what it masks)."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name}{list(shape)}" for name, shape in shapes.items())
        raise ValueError(f"shapes must match: {listed}")


def _weighted(x: Tensor, mask: Tensor) -> Tensor:
    """x * mask, with exact zeros (not NaN * 0) where the mask is 0."""
    return torch.where(mask != 0, x * mask, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """sum_i m_i x_i over ``dim`` (all elements when None)."""
    check_same_shape(x=x, mask=mask)
    weighted = _weighted(x, mask)
    return weighted.sum() if dim is None else weighted.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """sum_i m_i x_i / sum_i m_i over ``dim``; 0 where the mask holds no token (rather than 0/0 = NaN)."""
    total = masked_sum(x, mask, dim)
    count = mask.to(total.dtype)
    count = count.sum() if dim is None else count.sum(dim)
    return total / count.clamp_min(torch.finfo(total.dtype).tiny)


def masked_var(x: Tensor, mask: Tensor, dim: Optional[int] = None, unbiased: bool = True) -> Tensor:
    """Variance of the real entries: mean of (x - mean)^2, times n / (n - 1) (Bessel) when unbiased and n > 1."""
    mean = masked_mean(x, mask, dim)
    centred = x - (mean if dim is None else mean.unsqueeze(dim))
    var = masked_mean(centred**2, mask, dim)
    if unbiased:
        count = mask.to(var.dtype)
        count = count.sum() if dim is None else count.sum(dim)
        var = torch.where(count > 1, var * count / (count - 1).clamp_min(1e-12), var)
    return var


Reducer = Callable[[Tensor], Tensor]
"""Sums a tensor over every process (an all-reduce); None: this process's batch is the whole batch."""


def masked_moments(x: Tensor, mask: Tensor, reduce: Optional[Reducer] = None,
                   unbiased: bool = True) -> tuple[Tensor, Tensor]:
    """Mean and variance of the real entries of x, over the whole batch across processes when ``reduce`` sums
    over them: count, sum and sum of squares are summed (in float64) and the moments taken from the totals, so
    the result equals that of the concatenated batch. Variance is Bessel-corrected when unbiased and n > 1."""
    m = (mask != 0).to(torch.float64)
    xd = torch.where(mask != 0, x.detach().to(torch.float64), torch.zeros((), dtype=torch.float64, device=x.device))
    totals = torch.stack([m.sum(), xd.sum(), (xd * xd).sum()])
    if reduce is not None:
        totals = reduce(totals)
    n, total, total_sq = totals[0], totals[1], totals[2]
    mean = total / n.clamp_min(1.0)
    var = ((total_sq - n * mean * mean) / n.clamp_min(1.0)).clamp_min(0.0)
    if unbiased:
        var = torch.where(n > 1, var * n / (n - 1).clamp_min(1.0), var)
    return mean.to(x.dtype), var.to(x.dtype)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  reduce: Optional[Reducer] = None) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the real entries; with ``shift_mean=False`` the mean is added back
    (only the scale changes). Padding positions come back as 0. With ``reduce`` the statistics are those of the
    whole batch over every process (see ``masked_moments``), as one process would compute them.

    Used for PPO advantage normalisation (OpenAI baselines ppo2; Engstrom et al. 2020, arXiv:2005.12729, Sec. 3)
    and REINFORCE++'s global batch normalisation (arXiv:2501.03262).
    """
    mean, var = masked_moments(x, mask, reduce)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask != 0, whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))


def whiten(x: Tensor, shift_mean: bool = True, eps: float = 1e-8, reduce: Optional[Reducer] = None) -> Tensor:
    """``masked_whiten`` with every entry real."""
    return masked_whiten(x, torch.ones_like(x, dtype=torch.bool), shift_mean=shift_mean, eps=eps, reduce=reduce)


Count = Union[int, float, Tensor]
"""A token or sequence count: a number, or a 0-dim tensor (e.g. all-reduced over ranks)."""

# A loss aggregation takes per-token losses [B, T], the action mask and the keywords num_tokens, max_len, num_seqs
# (each uses the ones it needs and ignores the others), and returns a scalar.
LossAggregation = Callable[..., Tensor]
LOSS_AGGREGATIONS: Registry[LossAggregation] = Registry("loss aggregation")


def _require(value: Optional[Count], name: str, mode: str) -> Count:
    if value is None:
        raise ValueError(f"loss aggregation {mode!r} needs {name}=... (see rlhf.algos.aggregation.{mode})")
    if value <= 0:
        raise ValueError(f"loss aggregation {mode!r}: {name} must be > 0, got {value}")
    return value


@LOSS_AGGREGATIONS.register("token_mean")
@LOSS_AGGREGATIONS.register("bnpo")
def token_mean(loss: Tensor, mask: Tensor, **unused: Optional[Count]) -> Tensor:
    """L = sum_{i,t} m_it l_it / sum_{i,t} m_it: every real token of this micro-batch weighs the same.

    Called ``bnpo`` in TRL; it is DAPO's token-level loss (arXiv:2503.14476) taken over one micro-batch only, so it
    depends on how the step is split (use ``dapo`` for the split-independent form).
    """
    return masked_mean(loss, mask)


@LOSS_AGGREGATIONS.register("seq_mean_token_mean")
@LOSS_AGGREGATIONS.register("grpo")
def seq_mean_token_mean(
    loss: Tensor, mask: Tensor, *, num_seqs: Optional[Count] = None, **unused: Optional[Count]
) -> Tensor:
    """L = (1/G) sum_i (1/|o_i|) sum_t l_it: mean over each sequence's tokens, then over sequences.

    GRPO's objective (DeepSeekMath, arXiv:2402.03300, eq. 3). G is ``num_seqs`` when given (the step's number of
    sequences, so micro-batch losses add up to the step's loss), else the rows of this batch that hold a token.
    Dr. GRPO (arXiv:2503.20783) points out its length bias: a token of a short answer weighs more.
    """
    per_seq = masked_mean(loss, mask, dim=-1)
    if num_seqs is None:
        num_seqs = (mask != 0).any(-1).sum().clamp_min(1)
    return per_seq.sum() / num_seqs


@LOSS_AGGREGATIONS.register("seq_mean_token_sum")
def seq_mean_token_sum(
    loss: Tensor, mask: Tensor, *, num_seqs: Optional[Count] = None, **unused: Optional[Count]
) -> Tensor:
    """L = (1/G) sum_i sum_t l_it: each sequence's summed token loss, averaged over sequences.

    The sequence-level REINFORCE estimate (sum of log-probs of a sample times its return). G as in
    ``seq_mean_token_mean``.
    """
    per_seq = masked_sum(loss, mask, dim=-1)
    if num_seqs is None:
        num_seqs = (mask != 0).any(-1).sum().clamp_min(1)
    return per_seq.sum() / num_seqs


@LOSS_AGGREGATIONS.register("dr_grpo")
def dr_grpo(
    loss: Tensor,
    mask: Tensor,
    *,
    max_len: Optional[Count] = None,
    num_seqs: Optional[Count] = None,
    **unused: Optional[Count],
) -> Tensor:
    """L = sum_{i,t} m_it l_it / (G * max_len), max_len a constant (the generation budget).

    Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv:2503.20783): dividing by a
    constant instead of |o_i| removes the length bias. G is ``num_seqs`` when given, else this batch's rows.
    """
    max_len = _require(max_len, "max_len", "dr_grpo")
    if num_seqs is None:
        num_seqs = loss.shape[0]
    return masked_sum(loss, mask) / (num_seqs * max_len)


@LOSS_AGGREGATIONS.register("dapo")
def dapo(loss: Tensor, mask: Tensor, *, num_tokens: Optional[Count] = None, **unused: Optional[Count]) -> Tensor:
    """L = sum_{i,t} m_it l_it / N, N = ``num_tokens``, the real tokens of the whole optimizer step.

    DAPO's token-level policy-gradient loss (Yu et al. 2025, arXiv:2503.14476, "Token-Level Policy Gradient Loss")
    with the denominator taken over the whole step: the losses of its micro-batches (and ranks) add up to the
    step's token mean, however the step is split. The caller counts N before the step (summed over micro-batches
    and ranks) and must not let the engine average the micro-batch losses again.
    """
    num_tokens = _require(num_tokens, "num_tokens", "dapo")
    return masked_sum(loss, mask) / num_tokens


def aggregate(
    loss: Tensor,
    mask: Tensor,
    mode: str = "token_mean",
    *,
    num_tokens: Optional[Count] = None,
    max_len: Optional[Count] = None,
    num_seqs: Optional[Count] = None,
) -> Tensor:
    """Reduce a per-token loss [B, T] to a scalar with the aggregation named ``mode`` (see ``LOSS_AGGREGATIONS``).

    Keywords a mode does not use are ignored, so a trainer can pass the same ones whatever the user chose.
    """
    check_same_shape(loss=loss, mask=mask)
    return LOSS_AGGREGATIONS.get(mode)(loss, mask, num_tokens=num_tokens, max_len=max_len, num_seqs=num_seqs)
