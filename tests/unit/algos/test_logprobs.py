"""Chunked log-probabilities and entropies against the plain log_softmax computation."""

import pytest
import torch

from rlhf.algos.logprobs import entropy_from_logits, token_logprobs


def naive_logprobs(logits, tokens, temperature=1.0):
    return (logits.float() / temperature).log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)


def naive_entropy(logits, temperature=1.0):
    logp = (logits.float() / temperature).log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64, 1000])
def test_token_logprobs_equal_naive(chunk_size):
    torch.manual_seed(0)
    logits = torch.randn(4, 7, 11)
    tokens = torch.randint(0, 11, (4, 7))
    torch.testing.assert_close(token_logprobs(logits, tokens, chunk_size), naive_logprobs(logits, tokens))
    torch.testing.assert_close(entropy_from_logits(logits, chunk_size), naive_entropy(logits))


@pytest.mark.parametrize("chunk_size", [2, 5, 100])
def test_gradients_equal_naive(chunk_size):
    torch.manual_seed(1)
    logits = torch.randn(3, 6, 13, requires_grad=True)
    tokens = torch.randint(0, 13, (3, 6))
    weights = torch.randn(3, 6)
    for ours, naive in [
        (lambda x: token_logprobs(x, tokens, chunk_size, temperature=0.7), lambda x: naive_logprobs(x, tokens, 0.7)),
        (lambda x: entropy_from_logits(x, chunk_size, temperature=1.3), lambda x: naive_entropy(x, 1.3)),
    ]:
        (grad_ours,) = torch.autograd.grad((ours(logits) * weights).sum(), logits)
        (grad_naive,) = torch.autograd.grad((naive(logits) * weights).sum(), logits)
        torch.testing.assert_close(grad_ours, grad_naive)


def test_gradcheck_float64():
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 5, (2, 3))
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, tokens, chunk_size=2, temperature=0.9), (logits,))
    assert torch.autograd.gradcheck(lambda x: entropy_from_logits(x, chunk_size=4, temperature=0.9), (logits,))


def test_bf16_logits_are_upcast():
    torch.manual_seed(3)
    logits = (torch.randn(2, 5, 50) * 4).bfloat16().requires_grad_()
    tokens = torch.randint(0, 50, (2, 5))
    ours = token_logprobs(logits, tokens, chunk_size=3)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, naive_logprobs(logits, tokens))
    torch.testing.assert_close(entropy_from_logits(logits, chunk_size=3), naive_entropy(logits))
    ours.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    (expected,) = torch.autograd.grad(naive_logprobs(logits, tokens).sum(), logits)
    torch.testing.assert_close(logits.grad.float(), expected.float())


def test_non_contiguous_logits_and_2d_input():
    torch.manual_seed(4)
    full = torch.randn(3, 9, 17)
    tokens = torch.randint(0, 17, (3, 8))
    shifted = full[:, :-1]  # the usual "logits at t predict token t + 1" slice, not contiguous
    torch.testing.assert_close(token_logprobs(shifted, tokens, chunk_size=5), naive_logprobs(shifted, tokens))
    flat = full.reshape(-1, 17)
    flat_tokens = torch.randint(0, 17, (27,))
    torch.testing.assert_close(token_logprobs(flat, flat_tokens, chunk_size=4), naive_logprobs(flat, flat_tokens))


def test_bad_arguments():
    with pytest.raises(ValueError, match="vocabulary axis"):
        token_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        entropy_from_logits(torch.zeros(2, 3, 4), temperature=0.0)


def test_the_default_chunk_holds_a_fixed_number_of_logits_whatever_the_vocabulary():
    from rlhf.algos.logprobs import CHUNK_ELEMENTS, default_chunk_size

    assert default_chunk_size(128_000) == 262 and default_chunk_size(103) == CHUNK_ELEMENTS // 103
    assert default_chunk_size(CHUNK_ELEMENTS * 4) == 1  # never no positions
    logits, tokens = torch.randn(3, 5, 11), torch.randint(11, (3, 5))
    torch.testing.assert_close(token_logprobs(logits, tokens), naive_logprobs(logits, tokens))
