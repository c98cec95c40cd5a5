"""From canonical rows to token ids: the one place prompts are rendered, so every stage sees one format."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from rlhf.errors import DataError
from rlhf.models.packing import pack


def _is_chat(prompt: Any) -> bool:
    return isinstance(prompt, (list, tuple)) and all(isinstance(m, Mapping) and "role" in m for m in prompt)


def render_prompt(row: Mapping[str, Any], tokenizer, data_cfg: DictConfig) -> tuple[str, bool]:
    """The prompt text the model is conditioned on, and whether it came from the chat template.

    Chat prompts (message lists, or any prompt when data.chat_template=true) go through the tokenizer's
    template once, with the generation prompt; plain strings are wrapped in data.prompt_template.
    """
    prompt = row["prompt"]
    use_chat = data_cfg.chat_template if data_cfg.chat_template is not None else _is_chat(prompt)
    if use_chat:
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError("data.chat_template is on but the tokenizer has no chat template; "
                            "set data.chat_template=false or use a tokenizer with one")
        messages = list(prompt) if _is_chat(prompt) else [{"role": "user", "content": str(prompt)}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), True
    if _is_chat(prompt):
        raise DataError("chat-formatted prompts need data.chat_template=true (or null)")
    # A list of strings (e.g. a code task's test asserts) is shown one per line.
    fields = {k: "\n".join(v) if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v) else v
              for k, v in row.items()}
    fields = {k: v for k, v in fields.items() if isinstance(v, (str, int, float))}
    try:
        return data_cfg.prompt_template.format(**fields), False
    except (KeyError, IndexError) as exc:
        raise DataError(f"data.prompt_template refers to {exc} which is not a column; columns: "
                        f"{', '.join(fields)}") from None


def encode_prompt(text: str, from_chat: bool, tokenizer) -> list[int]:
    # A chat template already writes BOS into the text: adding special tokens again would double it.
    return tokenizer(text, add_special_tokens=not from_chat)["input_ids"]


def encode_response(text: str, tokenizer, add_eos: bool = True) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else ids


@dataclass
class Encoded:
    prompt_ids: list[int]
    response_ids: list[int]


def encode_rows(rows: Sequence[Mapping[str, Any]], tokenizer, data_cfg: DictConfig, response_key: str | None,
                source: str) -> tuple[list[Encoded], list[int], int]:
    """Encode prompt (+ response) of each row; returns the encodings, the kept row indices, and how many
    rows were dropped for a prompt longer than data.max_prompt_length (or raises, by data.on_long_prompt)."""
    if data_cfg.on_long_prompt not in ("drop", "error"):
        raise DataError(f"data.on_long_prompt must be drop or error, got {data_cfg.on_long_prompt!r}")
    out, kept, dropped = [], [], 0
    for i, row in enumerate(rows):
        text, from_chat = render_prompt(row, tokenizer, data_cfg)
        prompt_ids = encode_prompt(text, from_chat, tokenizer)
        if len(prompt_ids) > data_cfg.max_prompt_length:
            if data_cfg.on_long_prompt == "error":
                raise DataError(f"{source}: row {i}: prompt is {len(prompt_ids)} tokens, longer than "
                                f"data.max_prompt_length={data_cfg.max_prompt_length} (raise it, or set "
                                "data.on_long_prompt=drop)")
            dropped += 1
            continue
        response_ids = []
        if response_key is not None:
            budget = data_cfg.max_length - len(prompt_ids)
            response_ids = encode_response(str(row[response_key]), tokenizer)[:max(budget, 0)]
        out.append(Encoded(prompt_ids, response_ids))
        kept.append(i)
    return out, kept, dropped


def pad(seqs: Sequence[Sequence[int]], value: int, side: str = "right") -> torch.Tensor:
    width = max((len(s) for s in seqs), default=0)
    rows = [([value] * (width - len(s)) + list(s)) if side == "left" else (list(s) + [value] * (width - len(s)))
            for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


def collate_lm(batch: Sequence[Encoded], pad_id: int, loss_on_prompt: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response rows with `loss_mask` over the *target* positions (shifted by one),
    so loss_mask[b, t] says whether predicting input_ids[b, t+1] counts."""
    ids = [e.prompt_ids + e.response_ids for e in batch]
    input_ids = pad(ids, pad_id)
    attention_mask = pad([[1] * len(s) for s in ids], 0)
    targets = [[int(loss_on_prompt)] * (len(e.prompt_ids) - 1) + [1] * len(e.response_ids) for e in batch]
    loss_mask = pad(targets, 0)[:, : max(input_ids.shape[1] - 1, 0)]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask.float()}


def collate_lm_packed(batch: Sequence[Encoded], loss_on_prompt: bool = False) -> dict[str, torch.Tensor]:
    """collate_lm's rows packed into one row of their real tokens (rlhf.models.packing.pack): input_ids [1, T] (the
    packed ids) and loss_mask [1, T - 1] over target positions, 0 where a row's last token would predict the next
    row's first."""
    out = pack([e.prompt_ids + e.response_ids for e in batch])
    out["input_ids"] = out["packed_ids"]
    targets = [m for e in batch
               for m in [int(loss_on_prompt)] * (len(e.prompt_ids) - 1) + [1] * len(e.response_ids) + [0]]
    out["loss_mask"] = torch.tensor([targets[:-1]], dtype=torch.float32)
    return out


def collate_prompts(prompts: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts for generation: every row's last prompt token sits in the last column."""
    return {"input_ids": pad(prompts, pad_id, side="left"),
            "attention_mask": pad([[1] * len(p) for p in prompts], 0, side="left")}


BUCKET_OVERHEAD_TOKENS = 64
"""What one more forward pass costs, in padded tokens' worth of work: a split into length buckets is taken only
where it saves more padding than that. Measured for the embedded model's forward and backward on CPU: time is
about proportional to tokens, with a fixed cost per pass below 64 tokens' worth."""


def length_buckets(extents: Sequence[int], max_buckets: int = 4,
                   overhead: int = BUCKET_OVERHEAD_TOKENS) -> list[tuple[list[int], int]]:
    """Split rows of a right-padded batch into at most `max_buckets` groups of similar length, each to run as its
    own forward pass padded only to its own longest row: (row indices, that length) per group, longest first.

    `extents[i]` is how far row i's real tokens reach. The split minimises padded tokens plus `overhead` per
    group (an exact dynamic programme over the rows sorted by extent: the best groups are runs of that order),
    so a batch of rows of equal length stays one group.
    """
    order = sorted(range(len(extents)), key=lambda i: -extents[i])
    n = len(order)
    if n == 0:
        return []
    longest = np.array([extents[i] for i in order], dtype=np.float64)
    starts = np.arange(n)
    # best[k, j]: least cost of the first j sorted rows in k groups; a group of rows i..j-1 costs (j - i) times its
    # longest (its first row) plus the overhead.
    best = np.full((max_buckets + 1, n + 1), np.inf)
    cut = np.zeros((max_buckets + 1, n + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for k in range(1, max_buckets + 1):
        for j in range(1, n + 1):
            costs = best[k - 1, :j] + (j - starts[:j]) * longest[:j] + overhead
            cut[k, j] = int(costs.argmin())
            best[k, j] = costs[cut[k, j]]
    k = int(best[1:, n].argmin()) + 1
    groups, j = [], n
    while j > 0:
        i = int(cut[k, j])
        groups.append((order[i:j], extents[order[i]]))
        j, k = i, k - 1
    return groups[::-1]
