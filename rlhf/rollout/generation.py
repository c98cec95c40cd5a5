"""Batched sampling with a KV cache, shared by evaluation and the RL rollouts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from transformers.generation.logits_process import (LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from rlhf.data.tokenize import collate_prompts

_M32 = 0xFFFFFFFF


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


def sample_seeds(seed: int, positions: Sequence[int], per_position: int) -> list[int]:
    """One 32-bit seed for response j of the prompt at global sample position k, for every k in `positions`."""
    return [int(np.random.SeedSequence([seed, k, j]).generate_state(1)[0]) for k in positions for j in range(per_position)]


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's finaliser on int64 tensors holding 32-bit values (products masked back to 32 bits)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


class SeededSampling(LogitsProcessor):
    """Sampling as greedy decoding of noisy logits: argmax(logits + Gumbel noise) is a draw from softmax(logits)
    (the Gumbel-max trick). Row i's noise at decode step t is a hash of (seed_i, t, token id), so what a row samples
    depends on its seed and its own logits only: not on the rows beside it, the batch size, the padding or the
    number of processes. That is what lets N processes (or a run resumed on M) sample what one process would."""

    def __init__(self, seeds: Sequence[int]):
        self.seeds = torch.tensor([s & _M32 for s in seeds], dtype=torch.int64)[:, None]
        self.start: int | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.start is None:  # the first decode step: the prompt width, and the device the seeds live on
            self.start = input_ids.shape[1]
            self.seeds = self.seeds.to(scores.device)
        step = input_ids.shape[1] - self.start
        row = _fmix32((self.seeds + step * 0x9E3779B9) & _M32)
        token = torch.arange(scores.shape[-1], device=scores.device, dtype=torch.int64)
        bits = _fmix32(row ^ ((token * 0x27D4EB2F + 0x165667B1) & _M32)) >> 8
        uniform = (bits.float() + 0.5) / 2.0 ** 24  # in (0, 1): the noise below is always finite
        return scores.float() - torch.log(-torch.log(uniform))


def _processors(params: SamplingParams, seeds: Sequence[int]) -> LogitsProcessorList:
    warpers = [TemperatureLogitsWarper(params.temperature)]
    if params.top_k > 0:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    return LogitsProcessorList([*warpers, SeededSampling(seeds)])


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], pad_id: int, eos_id: int | None, params: SamplingParams,
             batch_size: int, synced_gpus: bool = False, seeds: Sequence[int] | None = None) -> list[list[int]]:
    """Sample a response for every prompt (token ids); each response ends at (and keeps) its first EOS.

    With `seeds` (one per prompt) row i's sample is a function of seeds[i] alone (SeededSampling); without, torch's
    sampler draws from the global RNG."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    greedy = params.greedy or params.temperature <= 0
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        batch = {k: v.to(device) for k, v in collate_prompts(prompts[start:start + batch_size], pad_id).items()}
        if greedy:
            kwargs = dict(do_sample=False)
        elif seeds is not None:
            kwargs = dict(do_sample=False, logits_processor=_processors(params, seeds[start:start + batch_size]))
        else:
            kwargs = dict(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        sequences = model.generate(**batch, max_new_tokens=params.max_new_tokens, pad_token_id=pad_id,
                                   eos_token_id=eos_id, synced_gpus=synced_gpus, use_cache=True, **kwargs)
        responses = sequences[:, batch["input_ids"].shape[1]:].cpu()
        lengths, _ = response_lengths(responses, eos_id)
        out.extend(row[:n].tolist() for row, n in zip(responses, lengths))
    model.train(was_training)
    return out
