"""Experience: what a rollout hands to the RL update (sequences, masks, log-probs, rewards, advantages).

One record type, built here and consumed by PPO and GRPO alike. Masks travel with the tensors they mask.
Layout of a row: [left-padded prompt | response, right-padded after its first EOS]; `action_mask` is 1 on the
response's real tokens (its EOS included) and 0 on every prompt and padding position.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional, Sequence

import torch
from torch import Tensor

from rlhf.algos.kl import exact_kl
from rlhf.algos.logprobs import entropy_from_logits, token_logprobs
from rlhf.data.tokenize import pad
from rlhf.models.packing import pack, packed_forward, supports_packing
from rlhf.models.prefix import distinct_rows, run_continuation, run_prefix
from rlhf.rollout.generation import response_lengths


@dataclass
class Experience:
    sequences: Tensor  # [B, P+R] token ids
    attention_mask: Tensor  # [B, P+R]
    action_mask: Tensor  # [B, R] over the response columns
    prompt_width: int  # P: responses start at this column
    truncated: Tensor  # [B] bool: hit the length limit without EOS
    old_logprobs: Optional[Tensor] = None  # [B, R]
    ref_logprobs: Optional[Tensor] = None  # [B, R]
    values: Optional[Tensor] = None  # [B, R]
    rewards: Optional[Tensor] = None  # [B] sequence rewards
    advantages: Optional[Tensor] = None  # [B] or [B, R]
    returns: Optional[Tensor] = None  # [B, R]
    extras: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def select(self, index: Sequence[int] | Tensor) -> "Experience":
        """Rows `index` of every tensor (for mini-batches and micro-batches)."""
        index = torch.as_tensor(index, dtype=torch.long)
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value[index] if isinstance(value, Tensor) and value.dim() > 0 else value
        return Experience(**out)

    def to(self, device: torch.device) -> "Experience":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, Tensor):
                moved[name] = value.to(device)
        return Experience(**moved)


def build_experience(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
                     eos_id: Optional[int], max_new_tokens: int) -> Experience:
    """Pack prompt and response token lists into the padded layout (masks from lengths, never from pad ids)."""
    prompt_ids = pad(prompts, pad_id, side="left")
    prompt_mask = pad([[1] * len(p) for p in prompts], 0, side="left")
    response_ids = pad(responses, pad_id)
    action_mask = pad([[1] * len(r) for r in responses], 0)
    if response_ids.shape[1] == 0:  # every response empty: keep one column so shapes stay valid
        response_ids = torch.full((len(responses), 1), pad_id)
        action_mask = torch.zeros((len(responses), 1), dtype=torch.long)
    _, ended = response_lengths(response_ids.masked_fill(action_mask == 0, -1), eos_id)
    lengths = action_mask.sum(-1)
    return Experience(
        sequences=torch.cat([prompt_ids, response_ids], dim=1),
        attention_mask=torch.cat([prompt_mask, action_mask], dim=1),
        action_mask=action_mask.float(),
        prompt_width=prompt_ids.shape[1],
        truncated=~ended & (lengths >= max_new_tokens),
    )


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only, as generation counts them for left-padded prompts."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def _response_logit_blocks(model, exp: Experience, shared_prefix: bool = False) -> list[Tensor]:
    """The logits that predict each response token, as blocks along the response axis whose widths add up to R
    ([B, R_i, V] each): one forward over [prompt | response], one block.

    With shared_prefix, rows whose prompts are the same (a GRPO group) share one forward of that prompt: its
    keys and values are indexed out to every row of the group (a differentiable copy, so the prompt's gradient
    is the sum of its rows'), then the responses run over them. Same logits, G - 1 fewer prompt passes per group,
    in two blocks (the prompt's last position, then the responses' positions but the last): concatenating them
    would copy the largest tensor of the step (B x R x V) in the forward pass and again in the backward pass."""
    width = exp.sequences.shape[1] - exp.prompt_width
    positions = position_ids(exp.attention_mask)
    if shared_prefix:
        p = exp.prompt_width
        holders, owner = distinct_rows(exp.sequences[:, :p], exp.attention_mask[:, :p])
        if len(holders) < len(exp):
            prompt, cache = run_prefix(model, exp.sequences[holders, :p], exp.attention_mask[holders, :p],
                                       positions[holders, :p], logits_to_keep=1)
            cache.batch_select_indices(owner)
            # the last response position predicts nothing: its logits are not computed
            keep = torch.arange(width - 1, device=exp.sequences.device)
            response = run_continuation(model, cache, exp.sequences[:, p:], exp.attention_mask, positions[:, p:],
                                        logits_to_keep=keep)
            return [prompt.logits[owner], response.logits]
    out = model(input_ids=exp.sequences, attention_mask=exp.attention_mask, position_ids=positions,
                logits_to_keep=width + 1, use_cache=False)
    return [out.logits[:, :-1]]


def _packed_logit_blocks(model, exp: Experience) -> tuple[list[Tensor], list[Tensor]]:
    """_response_logit_blocks for a model on the packed attention (rlhf.models.packing): the rows' real tokens as
    one sequence, each distinct prompt once, logits only where they predict a response token. Returns the blocks
    and, for each, the (row, column) [2, N] of the response tokens its N positions predict, in the block's order:
    [prompts' last positions, one per row, [B, 1, V]] and [every other predicting position, [1, N, V]] (no copy
    of the largest one, and no logits for padding)."""
    p = exp.prompt_width
    rows, prefixes = [], []
    for ids, mask in zip(exp.sequences.tolist(), exp.attention_mask.tolist()):
        prompt = [t for t, m in zip(ids[:p], mask[:p]) if m]
        rows.append(prompt + [t for t, m in zip(ids[p:], mask[p:]) if m])
        prefixes.append((tuple(prompt), len(prompt)))
    packed = pack(rows, prefixes)
    index = packed["packed_rows"].tolist()  # read on the host, before the batch moves to the device
    prompt_last = [index[b][length - 1] for b, (_, length) in enumerate(prefixes)]
    distinct = sorted(set(prompt_last))
    # response token j >= 1 of row b is predicted by the row's token before it, which only that row holds
    within = [(b, j) for b, (_, length) in enumerate(prefixes) for j in range(1, len(rows[b]) - length)]
    keep = distinct + [index[b][prefixes[b][1] + j - 1] for b, j in within]
    device = exp.sequences.device
    batch = {k: v.to(device) for k, v in packed.items()}
    logits = packed_forward(model, batch, logits_to_keep=torch.tensor(keep, device=device)).logits
    slot = {position: i for i, position in enumerate(distinct)}
    first = logits[0, [slot[i] for i in prompt_last]].unsqueeze(1)  # [B, 1, V]
    row_ids = torch.arange(len(rows), device=device)
    where = [torch.stack([row_ids, torch.zeros_like(row_ids)]),
             torch.tensor([[b for b, _ in within], [j for _, j in within]], dtype=torch.long,
                          device=device).reshape(2, -1)]
    return [first, logits[:, len(distinct):]], where


def _response_logits(model, exp: Experience, shared_prefix: bool = False) -> Tensor:
    """The logits that predict each response token, [B, R, V] (see _response_logit_blocks)."""
    return torch.cat(_response_logit_blocks(model, exp, shared_prefix), dim=1)


def response_logprobs(model, exp: Experience, temperature: float = 1.0, with_entropy: bool = False,
                      shared_prefix: bool = False, entropy_grad: bool = False):
    """log pi(y_t | x, y_<t) for every response column [B, R] (and the entropy there if asked).

    Only the logits that predict response tokens are computed (`logits_to_keep`), and the log-softmax is
    taken in chunks, so no [B, T, vocab] float32 tensor is held. A model on the packed attention runs padding-free
    with each prompt once (_packed_logit_blocks); otherwise shared_prefix: see _response_logit_blocks.
    The entropy is a statistic unless `entropy_grad` (an entropy bonus in the loss): its backward pass is a second
    chunked pass over the logits, paid only when the gradient is wanted."""
    response = exp.sequences[:, exp.prompt_width:]
    if supports_packing(model):
        blocks, where = _packed_logit_blocks(model, exp)
        targets = [response[rows, columns].view(b.shape[:-1]) for b, (rows, columns) in zip(blocks, where)]
    else:
        blocks, where = _response_logit_blocks(model, exp, shared_prefix), None
        targets = response.split([b.shape[1] for b in blocks], dim=1)
    logprobs = _response_columns([token_logprobs(b, y, temperature=temperature) for b, y in zip(blocks, targets)],
                                 where, exp)
    if not with_entropy:
        return logprobs, None
    return logprobs, _response_columns([entropy_from_logits(b if entropy_grad else b.detach(), temperature=temperature)
                                        for b in blocks], where, exp)


def _response_columns(parts: list[Tensor], where: Optional[list[Tensor]], exp: Experience) -> Tensor:
    """Per-block values as [B, R]: blocks side by side, or (packed) each value at its (row, column), 0 elsewhere."""
    if where is None:
        return torch.cat(parts, dim=1)
    out = parts[0].new_zeros(exp.action_mask.shape)
    for values, (rows, columns) in zip(parts, where):
        out = out.index_put((rows, columns), values.flatten())
    return out


@torch.no_grad()
def _in_micro_batches(fn, model, exp: Experience, micro_batch_size: int, **kwargs) -> list:
    """fn(model, micro-batch) over `exp` in eval mode without gradient (rollout-time log-probs and values)."""
    was_training = model.training
    model.eval()
    parts = [fn(model, exp.select(range(i, min(i + micro_batch_size, len(exp)))), **kwargs)
             for i in range(0, len(exp), micro_batch_size)]
    model.train(was_training)
    return parts


def batched_logprobs(model, exp: Experience, micro_batch_size: int, temperature: float = 1.0,
                     shared_prefix: bool = False) -> Tensor:
    """response_logprobs in micro-batches without gradient (old and reference log-probs)."""
    parts = _in_micro_batches(response_logprobs, model, exp, micro_batch_size, temperature=temperature,
                              shared_prefix=shared_prefix)
    return torch.cat([p[0] for p in parts])

def response_kl(model, reference, exp: Experience) -> Tensor:
    """Exact KL(pi || pi_ref) summed over each response's tokens, [B] (nats per response)."""
    kl = exact_kl(_response_logits(model, exp), _response_logits(reference, exp), exp.action_mask)
    return kl.sum(-1)


@torch.no_grad()
def batched_response_kl(model, reference, exp: Experience, micro_batch_size: int) -> Tensor:
    """response_kl in micro-batches without gradient (both models in eval mode, then restored)."""
    modes = (model.training, reference.training)
    model.eval()
    reference.eval()
    parts = [response_kl(model, reference, exp.select(range(i, min(i + micro_batch_size, len(exp)))))
             for i in range(0, len(exp), micro_batch_size)]
    model.train(modes[0])
    reference.train(modes[1])
    return torch.cat(parts) if parts else torch.zeros(0)


def response_values(critic, exp: Experience) -> tuple[Tensor, Tensor]:
    """The critic's V(s_t) before every response token, [B, R], and V after each response's last token, [B].

    V(s_t) is read at the position just before response token t (the state the action is taken in); the value
    after the last real token is what a truncated response bootstraps from. Padding positions are 0."""
    values = critic(exp.sequences, exp.attention_mask, position_ids(exp.attention_mask))
    width = exp.sequences.shape[1] - exp.prompt_width
    before = values[:, exp.prompt_width - 1:exp.prompt_width - 1 + width] * exp.action_mask
    last = exp.prompt_width - 1 + exp.action_mask.sum(-1).long()
    return before, values.gather(-1, last[:, None]).squeeze(-1)


def batched_values(critic, exp: Experience, micro_batch_size: int) -> tuple[Tensor, Tensor]:
    """response_values in micro-batches without gradient (the rollout's values)."""
    parts = _in_micro_batches(response_values, critic, exp, micro_batch_size)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
