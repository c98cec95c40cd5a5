"""Batched sampling with a KV cache, shared by evaluation and the RL rollouts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from transformers.generation.logits_process import (LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from rlhf.data.tokenize import collate_prompts
from rlhf.models.prefix import distinct_rows, run_continuation, run_prefix

_M32 = 0xFFFFFFFF


@dataclass
class SamplingParams:
    """How responses are drawn. No default length: it is the run's (rollout.max_new_tokens or
    eval.max_new_tokens), read once into this record and from it everywhere else."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False

    @property
    def argmax(self) -> bool:
        """Whether a draw is the most likely token (greedy set, or a temperature of 0)."""
        return self.greedy or self.temperature <= 0

    @classmethod
    def from_config(cls, rollout) -> "SamplingParams":
        return cls(rollout.max_new_tokens, rollout.temperature, rollout.top_p, rollout.top_k)


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
    """Sampling by inverse transform with one uniform number per row and decode step: the token at which the
    cumulative softmax(logits) first passes u, with u a 53-bit hash of (seed_i, t). What a row samples depends on
    its seed and its own logits only: not on the rows beside it, the batch size, the padding or the number of
    processes. That is what lets N processes (or a run resumed on M) sample what one process would.

    As a logits processor it returns 0 at the drawn token and -inf elsewhere, so the draw is the argmax (greedy
    decoding in transformers' generate samples the same). One hash per row, not one per vocabulary entry (the
    Gumbel-max form this replaced hashed B x V numbers a step: with a 32k vocabulary that was most of generation)."""

    def __init__(self, seeds: Sequence[int]):
        self.seeds = torch.tensor([s & _M32 for s in seeds], dtype=torch.int64)[:, None]
        self.start: int | None = None
        self.rows: torch.Tensor | None = None  # which of the seeds' rows the scores hold (None: all of them)

    def uniform(self, step: int) -> torch.Tensor:
        """u in (0, 1) for each row at decode step `step`, [B, 1] float64 with 53 random bits."""
        seeds = self.seeds if self.rows is None else self.seeds[self.rows]
        x = _fmix32((seeds + step * 0x9E3779B9) & _M32)
        high, low = _fmix32(x ^ 0x27D4EB2F) >> 5, _fmix32(x ^ 0x165667B1) >> 6  # 27 and 26 bits
        return ((high * 2 ** 26 + low).double() + 0.5) / 2.0 ** 53

    def draw(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """The drawn token of every row, [B]."""
        if self.start is None:  # the first decode step: the prompt width, and the device the seeds live on
            self.start = input_ids.shape[1]
            self.seeds = self.seeds.to(scores.device)
        # float64 sums: a float32 running sum over a 150k vocabulary drifts by more than the tail's probabilities
        cumulative = torch.softmax(scores.float(), -1).cumsum(-1, dtype=torch.float64)
        u = self.uniform(input_ids.shape[1] - self.start) * cumulative[:, -1:]  # rounding: the total may miss 1
        # token i is drawn when cumulative[i - 1] <= u < cumulative[i]: never one of probability 0
        return torch.searchsorted(cumulative, u, right=True).clamp_max(scores.shape[-1] - 1).squeeze(-1)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        token = self.draw(input_ids, scores)
        return torch.full_like(scores, float("-inf"), dtype=torch.float32).scatter_(-1, token[:, None], 0.0)


def _processors(params: SamplingParams, seeds: Sequence[int] | None) -> LogitsProcessorList:
    warpers = [TemperatureLogitsWarper(params.temperature)]
    if params.top_k > 0:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    return LogitsProcessorList([*warpers] + ([] if seeds is None else [SeededSampling(seeds)]))


def _all_done(done: bool, device: torch.device) -> bool:
    """Whether every rank has finished (ZeRO-3: a rank that stops early would leave the others' gathers hanging)."""
    flag = torch.tensor([0.0 if done else 1.0], device=device)
    torch.distributed.all_reduce(flag)
    return flag.item() == 0.0


COMPACT_AT = 0.75
"""The decode batch drops its finished rows once no more than this share of them is still running: a step's cost
falls with its rows, and one copy of the cache per drop is cheap beside the steps it saves."""


@torch.no_grad()
def _decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, choose,
            pad_id: int, eos_id: int | None, synced_gpus: bool) -> torch.Tensor:
    """Sampled tokens [B, <= max_new_tokens] after left-padded prompts, with a KV cache; rows past their EOS hold
    pad_id, and decoding stops when every row has ended (on every rank, with synced_gpus).

    A lean loop in place of `model.generate`: per token it runs the model once and `choose(sequences, logits,
    rows)`, and nothing else. Rows with the same prompt (a GRPO group) share one prefill: the prompt is run once
    and its keys and values are copied to the group's rows. Rows that have ended leave the batch (COMPACT_AT);
    `rows` says which rows of `sequences` the batch still holds."""
    batch, width = input_ids.shape
    device = input_ids.device
    keep, owner_ids = distinct_rows(input_ids, attention_mask)
    sequences = torch.full((batch, width + max_new_tokens), pad_id, dtype=input_ids.dtype, device=device)
    sequences[:, :width] = input_ids
    mask = torch.ones((batch, width + max_new_tokens), dtype=attention_mask.dtype, device=device)
    mask[:, :width] = attention_mask
    position = attention_mask.long().cumsum(-1) - 1
    out, cache = run_prefix(model, input_ids[keep], attention_mask[keep], position[keep].clamp_min(0),
                            logits_to_keep=1)
    logits = out.logits[:, -1].float()
    if len(keep) < batch:
        cache.batch_select_indices(owner_ids)
        logits = logits[owner_ids]
    next_position = position[:, -1:] + 1
    rows = torch.arange(batch, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)  # over the batch's rows
    steps = 0
    for t in range(max_new_tokens):
        token = choose(sequences[rows, :width + t], logits, rows)
        if eos_id is not None:
            token = torch.where(finished, torch.full_like(token, pad_id), token)
            finished |= token == eos_id
        sequences[rows, width + t] = token
        steps = t + 1
        running = int((~finished).sum())
        if (_all_done(running == 0, device) if synced_gpus else running == 0) or t + 1 == max_new_tokens:
            break
        if 0 < running <= COMPACT_AT * len(rows):  # never to no rows: under synced_gpus the forwards go on
            live = (~finished).nonzero().squeeze(1)
            cache.batch_select_indices(live)
            rows, token, next_position, finished = rows[live], token[live], next_position[live], finished[live]
        out = run_continuation(model, cache, token[:, None], mask[rows, :width + t + 1], next_position)
        logits = out.logits[:, -1].float()
        next_position = next_position + 1
    return sequences[:, width:width + steps]


def _greedy(_: torch.Tensor, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1)


def _chooser(params: SamplingParams, seeds: Sequence[int] | None):
    """The next token from the last position's float32 logits: greedy, a seeded draw (SeededSampling), or torch's draw
    from the warped distribution."""
    if params.argmax:
        return _greedy
    processors = list(_processors(params, seeds))
    seeded = processors.pop() if seeds is not None else None  # SeededSampling comes last: it draws

    def warp(sequences: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        # Each processor called directly: LogitsProcessorList inspects every processor's signature at every step.
        for processor in processors:
            logits = processor(sequences, logits)
        return logits

    def draw_seeded(sequences: torch.Tensor, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        seeded.rows = rows
        return seeded.draw(sequences, warp(sequences, logits))

    if seeded is not None:
        return draw_seeded
    return lambda sequences, logits, rows: torch.multinomial(torch.softmax(warp(sequences, logits), -1),
                                                             1).squeeze(1)


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], pad_id: int, eos_id: int | None, params: SamplingParams,
             batch_size: int, synced_gpus: bool = False, seeds: Sequence[int] | None = None) -> list[list[int]]:
    """Sample a response for every prompt (token ids); each response ends at (and keeps) its first EOS.

    With `seeds` (one per prompt) row i's sample is a function of seeds[i] alone (SeededSampling); without, torch's
    sampler draws from the global RNG."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        batch = {k: v.to(device) for k, v in collate_prompts(prompts[start:start + batch_size], pad_id).items()}
        choose = _chooser(params, None if seeds is None else seeds[start:start + batch_size])
        responses = _decode(model, batch["input_ids"], batch["attention_mask"], params.max_new_tokens, choose,
                            pad_id, eos_id, synced_gpus).cpu()
        lengths, _ = response_lengths(responses, eos_id)
        out.extend(row[:n].tolist() for row, n in zip(responses, lengths))
    model.train(was_training)
    return out
