"""Supervised fine-tuning loss."""

from __future__ import annotations

from torch import Tensor

from rlhf.algos.logprobs import token_logprobs


def sft_loss(logits: Tensor, input_ids: Tensor, loss_mask: Tensor, num_tokens: float | Tensor) -> Tensor:
    """Token-level negative log-likelihood of the completion, normalised by the step's token count.

        L = -(1/N) * sum_{b,t} m[b,t] * log p(x[b,t+1] | x[b,<=t])

    ``loss_mask`` m is over target positions ([B, T-1]); N (``num_tokens``) is the number of completion
    tokens in the whole optimizer step, summed over micro-batches and ranks, so the sum of the micro-batch
    losses is the step's token mean however the step is split (the "token-mean" of DAPO, arXiv:2503.14476).
    Standard causal-LM maximum likelihood (Radford et al. 2018); completion-only masking as in InstructGPT's SFT.
    """
    logprobs = token_logprobs(logits[:, :-1], input_ids[:, 1:])  # chunked: no float32 copy of all logits
    return -(logprobs * loss_mask).sum() / num_tokens
