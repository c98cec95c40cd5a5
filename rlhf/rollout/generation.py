"""Batched sampling with a KV cache, shared by evaluation and the RL rollouts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from rlhf.data.tokenize import collate_prompts


@dataclass
class SamplingParams:
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False


def response_lengths(responses: torch.Tensor, eos_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Length of each generated row up to and including its first EOS, and whether it ended with EOS.

    Lengths come from the first EOS, never from pad ids, so a tokenizer whose pad token is its EOS is fine."""
    n = responses.shape[1]
    if eos_id is None or n == 0:
        return torch.full((responses.shape[0],), n), torch.zeros(responses.shape[0], dtype=torch.bool)
    is_eos = responses == eos_id
    finished = is_eos.any(dim=1)
    first = torch.where(finished, is_eos.float().argmax(dim=1) + 1, torch.full_like(finished, n, dtype=torch.long))
    return first, finished


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], pad_id: int, eos_id: int | None, params: SamplingParams,
             batch_size: int, synced_gpus: bool = False) -> list[list[int]]:
    """Sample a response for every prompt (token ids); each response ends at (and keeps) its first EOS."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        batch = {k: v.to(device) for k, v in collate_prompts(prompts[start:start + batch_size], pad_id).items()}
        kwargs = dict(do_sample=False) if params.greedy or params.temperature <= 0 else dict(
            do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        sequences = model.generate(**batch, max_new_tokens=params.max_new_tokens, pad_token_id=pad_id,
                                   eos_token_id=eos_id, synced_gpus=synced_gpus, use_cache=True, **kwargs)
        responses = sequences[:, batch["input_ids"].shape[1]:].cpu()
        lengths, _ = response_lengths(responses, eos_id)
        out.extend(row[:n].tolist() for row, n in zip(responses, lengths))
    model.train(was_training)
    return out
