"""A prompt that several rows share, run once: its keys and values reused by every row that continues it.

A GRPO group is G responses to one prompt, a preference pair two responses to one. Run as separate rows, each
repeats the prompt's forward (and backward) pass. Here the distinct prompts run once with a KV cache, the cache
is indexed out to the rows (a differentiable copy: a prompt's gradient is the sum of its rows'), and only the
continuations run over it. Every position gets the numbers one forward per row would give it.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache


def cache_kwarg(model) -> str:
    """transformers renamed `past_key_values` to `cache` in 5.x; models with their own code may use either (a
    DeepSpeed engine is asked about the model it wraps)."""
    return _cache_kwarg(type(getattr(model, "module", model)))


@functools.lru_cache(maxsize=None)
def _cache_kwarg(model_class: type) -> str:
    # Looked up once per class: inspect.signature on every decode step cost about 3% of generation.
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def distinct_rows(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(holders, owner): the index of one row holding each distinct (ids, mask) row, in order of first appearance,
    and for every row which of those it equals, so that rows[holders][owner] == rows."""
    distinct: dict[tuple[int, ...], int] = {}
    holders: list[int] = []
    owner: list[int] = []
    for i, row in enumerate(torch.cat([input_ids, attention_mask], dim=1).tolist()):
        if tuple(row) not in distinct:
            distinct[tuple(row)] = len(holders)
            holders.append(i)
        owner.append(distinct[tuple(row)])
    device = input_ids.device
    return torch.tensor(holders, device=device, dtype=torch.long), torch.tensor(owner, device=device, dtype=torch.long)


def selected_cache(cache: DynamicCache, index: Tensor, config: Any) -> DynamicCache:
    """A new cache holding rows `index` of `cache` (which is left as it is, so it can be selected from again)."""
    return DynamicCache(ddp_cache_data=[(layer.keys[index], layer.values[index]) for layer in cache.layers],
                        config=config)


def run_prefix(model, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, **kwargs) -> tuple[Any, DynamicCache]:
    """model(...) over rows [B, P] of prefixes with a fresh KV cache: (its output, the filled cache). `kwargs` go
    to the model (e.g. logits_to_keep=1)."""
    cache = DynamicCache(config=getattr(model, "module", model).config)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                **{cache_kwarg(model): cache}, **kwargs)
    return out, cache


def run_continuation(model, cache: DynamicCache, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                     **kwargs) -> Any:
    """model(...) over continuations [B, R] of the prefixes held in `cache`; attention_mask covers prefix and
    continuation, [B, P + R]."""
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                 **{cache_kwarg(model): cache}, **kwargs)
