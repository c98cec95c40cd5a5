"""Padding-free forward passes: the rows of a batch run as one sequence of their real tokens.

A batch of rows of unequal length, padded to its longest, spends the padded positions' share of every matrix
product on nothing: 1.5x the work on a mix of 10-50 token rows. Here the tokens of all rows are packed into one
row [1, T] (with each token's own position id), so every linear layer, the output head and the loss see real
tokens only. Attention is the one place that must see rows: each layer gathers its queries, keys and values back
into the padded [B, L] layout, runs causal attention there (cheap at these lengths, and the fused kernel needs no
mask with right padding) and scatters the outputs back to the packed tokens.

The gather also lets rows share tokens: a prompt that several rows continue (a preference pair's two responses, a
GRPO group's G) is packed once and every row that continues it reads its keys and values. Each position gets the
numbers one forward per row would give it, and a shared token's gradient is the sum of its rows'.

Models opt in by running on the attention implementation `PACKED_SDPA` (an sdpa wrapper: without a layout it is
sdpa itself, so generation and padded passes are unchanged); `packed_forward` passes the layout through the
model's keyword arguments, which transformers hands to every attention call (and to a checkpointed layer's
recomputation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Mapping, Sequence

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

PACKED_SDPA = "rlhf_packed_sdpa"
"""The attention implementation name a packed model runs on (sdpa, plus the packed path)."""

LAYOUT_KWARG = "rlhf_packed_layout"


@dataclass
class PackedLayout:
    """Where each row's tokens sit among the T packed tokens.

    rows [B, L]: the packed index of row b's t-th token, T (one past the last) where the row has ended.
    owner [T]: the flat index b * L + t of one row position holding each packed token (its attention output is read
    there: a shared prompt token attends to the same prefix in every row that holds it).
    """

    rows: Tensor
    owner: Tensor

    @property
    def dense(self) -> bool:
        """Whether every row position holds a token of its own (rows of one length, nothing shared): the packed
        tokens are then the rows laid end to end, and the rows' layout is a view of them, with nothing to copy."""
        return self.owner.numel() == self.rows.numel()


def pack(rows: Sequence[Sequence[int]], prefixes: Sequence[tuple[Hashable, int]] | None = None) -> dict[str, Tensor]:
    """Token rows as one packed batch: `packed_ids` and `packed_positions` [1, T] (the model's input_ids and
    position_ids), and the layout's `packed_rows` [B, L] and `packed_owner` [T] (see PackedLayout). With `prefixes`, row i's first prefixes[i][1] tokens are shared with every
    other row of the same key prefixes[i][0] and prefix length (they must hold the same tokens there): packed once,
    read by all of them."""
    ids: list[int] = []
    positions: list[int] = []
    width = max((len(r) for r in rows), default=0)
    index = [[-1] * width for _ in rows]
    owner: list[int] = []
    shared: dict[tuple[Hashable, int], list[int]] = {}
    for b, row in enumerate(rows):
        start = 0
        if prefixes is not None and prefixes[b][1] > 0:
            key = tuple(prefixes[b])
            if key in shared:
                start = key[1]
                index[b][:start] = shared[key]
            else:
                shared[key] = list(range(len(ids), len(ids) + key[1]))
        for t in range(start, len(row)):
            index[b][t] = len(ids)
            owner.append(b * width + t)
            ids.append(row[t])
            positions.append(t)
    packed_rows = torch.tensor(index, dtype=torch.long).reshape(len(rows), width)
    return {"packed_ids": torch.tensor([ids], dtype=torch.long),
            "packed_positions": torch.tensor([positions], dtype=torch.long),
            "packed_rows": torch.where(packed_rows < 0, len(ids), packed_rows),
            "packed_owner": torch.tensor(owner, dtype=torch.long)}


def to_rows(packed: Tensor, rows: Tensor) -> Tensor:
    """Per-token outputs [1, T, ...] of a packed batch in the rows' layout [B, L, ...] given its `packed_rows`
    (zeros past each row's end; a shared prompt token's output copied to every row holding it, its gradient the sum
    of theirs). A dense layout (B x L == T: rows of one length, nothing shared) is the packed tokens laid end to end,
    so its rows are a view of them, with nothing to copy."""
    if rows.numel() == packed.shape[1]:
        return packed.reshape(*rows.shape, *packed.shape[2:])
    flat = torch.cat([packed[0], packed.new_zeros(1, *packed.shape[2:])])
    return flat.index_select(0, rows.reshape(-1)).view(*rows.shape, *packed.shape[2:])


def packed_sdpa_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                          **kwargs) -> tuple[Tensor, None]:
    """sdpa, or with a layout in kwargs the packed path: causal attention within each row of the layout."""
    layout: PackedLayout | None = kwargs.pop(LAYOUT_KWARG, None)
    if layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    q, k, v = (to_rows(x.transpose(1, 2), layout.rows).transpose(1, 2) for x in (query, key, value))  # [B, H, L, D]
    out, _ = sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)  # [B, L, H, D]
    out = out.reshape(1, -1, *out.shape[2:])
    return (out if layout.dense else out[0].index_select(0, layout.owner).unsqueeze(0)), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)


def supports_packing(model) -> bool:
    """Whether `model` (or the model a DeepSpeed engine wraps) runs on the packed attention implementation."""
    config = getattr(getattr(model, "module", model), "config", None)
    return getattr(config, "_attn_implementation", None) == PACKED_SDPA


def enable_packing(model) -> bool:
    """Switch a model on sdpa to PACKED_SDPA (the same numbers for every padded pass); False where it runs on
    another implementation (eager, flash attention, ...) or does not take one."""
    if supports_packing(model):
        return True
    if getattr(model.config, "_attn_implementation", None) != "sdpa" or not model._can_set_attn_implementation():
        return False
    model.set_attn_implementation(PACKED_SDPA)
    return True


def packed_forward(model, batch: Mapping[str, Tensor], **kwargs) -> Any:
    """model(...) over a packed batch (from `pack`): outputs hold one position per packed token, [1, T, ...]. The
    all-ones attention mask keeps transformers from building a [T, T] mask of its own (sdpa skips an all-ones
    mask)."""
    if not supports_packing(model):
        raise RuntimeError(f"{type(getattr(model, 'module', model)).__name__} does not run on {PACKED_SDPA}: "
                           "call enable_packing first (a packed batch through plain attention would mix its rows)")
    ids = batch["packed_ids"]
    layout = PackedLayout(batch["packed_rows"], batch["packed_owner"])
    return model(input_ids=ids, position_ids=batch["packed_positions"], attention_mask=torch.ones_like(ids),
                 use_cache=False, **{LAYOUT_KWARG: layout}, **kwargs)


def batch_forward(model, batch: Mapping[str, Tensor], **kwargs) -> Any:
    """model(...) over a packed batch (`pack`: packed_forward) or a padded one (input_ids and attention_mask)."""
    if "packed_rows" in batch:
        return packed_forward(model, batch, **kwargs)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
