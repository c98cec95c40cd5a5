"""Log-probabilities of given tokens, and entropies, from logits, a few rows at a time.

A float32 log-softmax over a 150k vocabulary for a whole batch of long responses is tens of GiB, most of it never
used: only one entry per row is wanted. Both functions here work through the rows in chunks, upcast one chunk at
a time, and keep only the per-row log-sum-exp for the backward pass, which recomputes the softmax chunk by chunk.
Peak extra memory is one float32 chunk ([chunk_size, V]), in the forward pass and in the backward pass.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

CHUNK_ELEMENTS = 2 ** 25
"""Logits per chunk when no chunk size is given: 128 MiB in float32, so 256 positions of a 128k vocabulary (a
chunk's temporaries, a few copies of it, stay well under the logits themselves) and whole batches of a small one.
A fixed 1024 positions made each copy 500-600 MiB at 128-150k: the peak of a GRPO step on the bench model."""


def default_chunk_size(vocab: int) -> int:
    """Positions per chunk for a vocabulary of `vocab` entries (CHUNK_ELEMENTS logits)."""
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precision, float64 stays float64 (so gradcheck works)."""
    return torch.promote_types(dtype, torch.float32)


def _chunks(batch: int, length: int, chunk_size: int) -> Iterator[tuple[slice, slice]]:
    """(batch slice, time slice) blocks of about ``chunk_size`` rows of a [batch, length, V] tensor.

    Blocks are views of the logits whatever their strides, so ``model(...).logits[:, :-1]`` is not copied.
    """
    if length == 0:
        return
    if length >= chunk_size:
        for b in range(batch):
            for t in range(0, length, chunk_size):
                yield slice(b, b + 1), slice(t, t + chunk_size)
    else:
        per_chunk = chunk_size // length
        for b in range(0, batch, per_chunk):
            yield slice(b, b + per_chunk), slice(None)


class _TokenLogprobs(torch.autograd.Function):
    """log p(y) = x_y - logsumexp(x) with x = logits / temperature, chunked over rows. logits [B, T, V]."""

    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor, chunk_size: int, temperature: float) -> Tensor:
        dtype = _compute_dtype(logits.dtype)
        logprobs = torch.empty(tokens.shape, dtype=dtype, device=logits.device)
        logsumexp = torch.empty(tokens.shape, dtype=dtype, device=logits.device)
        for b, t in _chunks(*tokens.shape, chunk_size):
            x = logits[b, t].to(dtype) / temperature
            logsumexp[b, t] = x.logsumexp(-1)
            logprobs[b, t] = x.gather(-1, tokens[b, t, None]).squeeze(-1) - logsumexp[b, t]
        ctx.save_for_backward(logits, tokens, logsumexp)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        return logprobs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs: Tensor):
        # d log p(y) / d x_j = 1[j = y] - softmax(x)_j, and d x / d logits = 1 / temperature.
        logits, tokens, logsumexp = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for b, t in _chunks(*tokens.shape, ctx.chunk_size):
            x = logits[b, t].to(logsumexp.dtype) / ctx.temperature
            g = grad_logprobs[b, t, None].to(x.dtype)
            grad = (x - logsumexp[b, t, None]).exp_().mul_(-g)
            grad.scatter_add_(-1, tokens[b, t, None], g)
            grad_logits[b, t] = grad / ctx.temperature
        return grad_logits, None, None, None


class _Entropy(torch.autograd.Function):
    """H = logsumexp(x) - sum_j p_j x_j with p = softmax(x), x = logits / temperature. logits [B, T, V]."""

    @staticmethod
    def forward(ctx, logits: Tensor, chunk_size: int, temperature: float) -> Tensor:
        dtype = _compute_dtype(logits.dtype)
        entropy = torch.empty(logits.shape[:-1], dtype=dtype, device=logits.device)
        logsumexp = torch.empty(logits.shape[:-1], dtype=dtype, device=logits.device)
        for b, t in _chunks(*logits.shape[:-1], chunk_size):
            x = logits[b, t].to(dtype) / temperature
            logsumexp[b, t] = x.logsumexp(-1)
            p = (x - logsumexp[b, t, None]).exp()
            entropy[b, t] = logsumexp[b, t] - (p * x).sum(-1)
        ctx.save_for_backward(logits, logsumexp)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        return entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_entropy: Tensor):
        # d H / d x_j = -p_j (x_j - sum_k p_k x_k).
        logits, logsumexp = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for b, t in _chunks(*logits.shape[:-1], ctx.chunk_size):
            x = logits[b, t].to(logsumexp.dtype) / ctx.temperature
            p = (x - logsumexp[b, t, None]).exp()
            expected_x = (p * x).sum(-1, keepdim=True)
            grad = p.mul_(x.sub_(expected_x)).mul_(-grad_entropy[b, t, None].to(x.dtype))
            grad_logits[b, t] = grad / ctx.temperature
        return grad_logits, None, None


def _as_3d(logits: Tensor) -> Tensor:
    """[N, V] -> [1, N, V]; [B, T, V] as is; more leading axes are merged into B."""
    if logits.dim() < 2:
        raise ValueError(f"logits need a vocabulary axis and at least one position axis, got {list(logits.shape)}")
    if logits.dim() == 2:
        return logits.unsqueeze(0)
    return logits.reshape(-1, *logits.shape[-2:])


def _check_args(chunk_size: int, temperature: float) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def token_logprobs(
    logits: Tensor, tokens: Tensor, chunk_size: int | None = None, temperature: float = 1.0
) -> Tensor:
    """log pi(y_t | context) = log_softmax(logits / temperature)[..., y_t], for logits [..., V] and tokens [...].

    Returns float32 (float64 for float64 logits) of the shape of ``tokens``; differentiable with respect to
    ``logits``. Equal to ``(logits.float() / temperature).log_softmax(-1).gather(-1, tokens[..., None])`` without
    holding that [..., V] float32 tensor. The caller aligns logits and tokens (logits at position t predict the
    token at t + 1). Every token must be a valid id, padding included (mask the result, not the ids: -100 fails).
    """
    chunk_size = default_chunk_size(logits.shape[-1]) if chunk_size is None else chunk_size
    _check_args(chunk_size, temperature)
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {list(logits.shape)} must be tokens {list(tokens.shape)} plus a vocabulary axis")
    logits3 = _as_3d(logits)
    tokens2 = tokens.long().reshape(logits3.shape[:-1])
    return _TokenLogprobs.apply(logits3, tokens2, chunk_size, float(temperature)).view(tokens.shape)


def entropy_from_logits(logits: Tensor, chunk_size: int | None = None, temperature: float = 1.0) -> Tensor:
    """H(pi(. | context)) = -sum_v p_v log p_v with p = softmax(logits / temperature), for logits [..., V] -> [...].

    Returns float32 (float64 for float64 logits); differentiable with respect to ``logits``.
    """
    chunk_size = default_chunk_size(logits.shape[-1]) if chunk_size is None else chunk_size
    _check_args(chunk_size, temperature)
    return _Entropy.apply(_as_3d(logits), chunk_size, float(temperature)).view(logits.shape[:-1])
