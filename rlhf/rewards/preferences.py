"""Preference data as the reward model is trained and judged on it: loading and encoding the rows, the loss
algo.loss names per list, and held-out metrics (pairwise accuracy, margin, reward mean/std) summed so that they
add up over micro-batches and ranks. Used by `rlhf train-rm` and `rlhf eval`."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from rlhf.algos.reward_model import RM_LOSSES, ranking_accuracy, ranking_centering_loss
from rlhf.data.formats import drop_invalid_preferences
from rlhf.data.loading import load_rows
from rlhf.engine import distributed as dist
from rlhf.errors import DataError
from rlhf.rewards.model import Preference, encode_preference, score_preferences


def load_preferences(cfg: Any, split: str, tokenizer, on_invalid: str, info=print) -> list[Preference]:
    """Canonical preference rows of `split`, invalid pairs dropped (or refused) and counted, long prompts dropped
    (or refused, by data.on_long_prompt), encoded the way the model is trained and scored."""
    data = cfg.data
    source = f"{data.path or f'built-in task {data.task!r}'} [{split}]"
    rows = load_rows(data, "preference", split, cfg.run.seed)
    if len(rows) == 0:
        return []
    rows, invalid = drop_invalid_preferences(rows, on_invalid, source)
    examples, long_prompts, cut = [], 0, 0
    for i, row in enumerate(rows):
        example, n_cut = encode_preference(row, tokenizer, data)
        if len(example.prompt_ids) > data.max_prompt_length:
            if data.on_long_prompt == "error":
                raise DataError(f"{source}: row {i}: prompt is {len(example.prompt_ids)} tokens, longer than "
                                f"data.max_prompt_length={data.max_prompt_length} (raise it, or set "
                                "data.on_long_prompt=drop)")
            long_prompts += 1
            continue
        examples.append(example)
        cut += n_cut
    if invalid:
        info(f"{source}: dropped {invalid} of {len(rows) + invalid} preference rows with identical or empty "
             "responses (algo.on_invalid=error refuses them instead)")
    if long_prompts:
        info(f"{source}: dropped {long_prompts} rows whose prompt is longer than "
             f"data.max_prompt_length={data.max_prompt_length}")
    if cut:
        info(f"{source}: cut {cut} responses to data.max_length={data.max_length} tokens (EOS kept last)")
    if split == "train" and not examples:
        raise DataError(f"{source}: no preference rows left")
    return examples



def list_losses(algo: Any, scores: torch.Tensor, batch: dict[str, torch.Tensor], use_margin: bool) -> torch.Tensor:
    """The loss algo.loss names for each list [N] (scores best first), plus algo.center_coef's centring term."""
    kwargs = {}
    if algo.loss == "pairwise":
        kwargs = {"margin": batch["margin"] if use_margin else None, "label_smoothing": algo.label_smoothing}
    losses = RM_LOSSES.get(algo.loss)(scores, batch["list_mask"], reduction="none", **kwargs)
    if algo.center_coef:
        losses = losses + ranking_centering_loss(scores, batch["list_mask"], algo.center_coef, reduction="none")
    return losses



def preference_sums(scores: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Sums over lists [N, K] (best first) that add up across micro-batches and ranks; the best response plays
    `chosen` against each of the others (`rejected`)."""
    best, others, real = scores[:, :1], scores[:, 1:], mask[:, 1:]
    diff = best - others
    k = mask.sum(-1).float()
    rank_pairs = float((k * (k - 1) / 2).sum())
    return {"lists": float(len(scores)), "pairs": float(real.sum()),
            "correct": float(((diff > 0) & real).sum()), "margin": float(diff[real].sum()),
            "chosen": float(best.sum()), "chosen_sq": float((best ** 2).sum()),
            "rejected": float(others[real].sum()), "rejected_sq": float((others[real] ** 2).sum()),
            "rank_pairs": rank_pairs, "rank_correct": float(ranking_accuracy(scores, mask)) * rank_pairs,
            "long_lists": float((k > 2).sum())}



def preference_metrics(total: dict[str, float], prefix: str) -> dict[str, float]:
    """Pairwise accuracy (ties are wrong), mean margin r_chosen - r_rejected, reward mean/std of chosen and
    rejected, and for lists of K > 2 the ranking accuracy over all their ordered pairs."""
    def mean_std(key: str, n: float) -> tuple[float, float]:
        mean = total[key] / max(n, 1.0)
        return mean, math.sqrt(max(total[f"{key}_sq"] / max(n, 1.0) - mean ** 2, 0.0))

    chosen_mean, chosen_std = mean_std("chosen", total["lists"])
    rejected_mean, rejected_std = mean_std("rejected", total["pairs"])
    out = {"pairwise_accuracy": total["correct"] / max(total["pairs"], 1.0),
           "margin": total["margin"] / max(total["pairs"], 1.0),
           "chosen_mean": chosen_mean, "chosen_std": chosen_std,
           "rejected_mean": rejected_mean, "rejected_std": rejected_std}
    if total["long_lists"] > 0:
        out["ranking_accuracy"] = total["rank_correct"] / max(total["rank_pairs"], 1.0)
    return {f"{prefix}{k}": v for k, v in out.items()}



def padded_lists(scores: Sequence[Sequence[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(s) for s in scores), default=2)
    mask = torch.tensor([[k < len(s) for k in range(width)] for s in scores])
    values = torch.tensor([list(s) + [0.0] * (width - len(s)) for s in scores], dtype=torch.float32)
    return values.reshape(len(scores), width), mask.reshape(len(scores), width)



def rank_share(examples: Sequence[Preference]) -> tuple[list[Preference], int]:
    """This rank's rows, padded with repeats of the first to the same count on every rank (ZeRO-3 needs every
    rank in every forward pass); returns (rows, how many are real)."""
    mine = list(examples[dist.rank()::dist.world_size()])
    per_rank = math.ceil(len(examples) / dist.world_size())
    return mine + [examples[0]] * (per_rank - len(mine)), len(mine)



def evaluate_preferences(classifier, examples: Sequence[Preference], pad_id: int, score: str, batch_size: int,
                         algo: Any, use_margin: bool) -> tuple[dict[str, float], list[list[float]]]:
    """Held-out loss and preference metrics over every rank's share of `examples`, and this rank's scores."""
    mine, real = rank_share(examples)
    device = next(classifier.parameters()).device
    scores = score_preferences(classifier, mine, pad_id, score, batch_size, device)[:real]
    values, mask = padded_lists(scores)
    batch = {"list_mask": mask, "margin": torch.tensor([e.margin for e in mine[:real]], dtype=torch.float32)}
    sums = {"loss": float(list_losses(algo, values, batch, use_margin).sum()), **preference_sums(values, mask)}
    total = dist.all_reduce_sum(sums)
    return {"loss": total["loss"] / max(total["lists"], 1.0), **preference_metrics(total, "")}, scores
