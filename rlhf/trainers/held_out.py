"""Held-out evaluation shared by every policy stage and `rlhf eval`: greedy answers scored by rule rewards."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from omegaconf import DictConfig

from rlhf.algos.reward_model import ranking_auc
from rlhf.data.tokenize import encode_prompt, render_prompt
from rlhf.engine import distributed as dist
from rlhf.rewards.rules import REWARD_FUNCS
from rlhf.rollout.experience import batched_response_kl, build_experience
from rlhf.rollout.generation import SamplingParams, generate


@dataclass
class HeldOut:
    """Held-out prompts, already rendered and encoded once, with the rows their rewards need."""

    rows: list[dict[str, Any]]
    prompts: list[str]
    prompt_ids: list[list[int]]

    @classmethod
    def build(cls, rows: Sequence[Mapping[str, Any]], tokenizer, data_cfg: DictConfig,
              limit: int | None = None) -> "HeldOut":
        rows = [dict(r) for r in rows][: limit or None]
        rendered = [render_prompt(r, tokenizer, data_cfg) for r in rows]
        ids = [encode_prompt(text, chat, tokenizer) for text, chat in rendered]
        return cls(rows, [t for t, _ in rendered], ids)

    def __len__(self) -> int:
        return len(self.rows)


def score_completions(held_out: HeldOut, indices: Sequence[int],
                      completions: Sequence[str]) -> tuple[dict[str, float], list[Optional[float]]]:
    """Sums (not means) of accuracy, format and length over the given rows, to be reduced across ranks, and each
    row's accuracy (None where the row has no answer)."""
    prompts = [held_out.prompts[i] for i in indices]
    columns = {k: [held_out.rows[i].get(k) for i in indices] for k in held_out.rows[0] if k != "prompt"}
    sums = {"n": float(len(indices)), "format": 0.0, "correct": 0.0, "n_answer": 0.0}
    for value in REWARD_FUNCS.get("format")(prompts, list(completions), **columns):
        sums["format"] += value or 0.0
    correct: list[Optional[float]] = [None] * len(indices)
    if "answer" in columns:
        correct = list(REWARD_FUNCS.get("accuracy")(prompts, list(completions), **columns))
        for value in correct:
            if value is not None:
                sums["correct"] += value
                sums["n_answer"] += 1
    return sums, correct


def reward_sums(rewards, held_out: HeldOut, indices: Sequence[int], completions: Sequence[str],
                count: int | None = None) -> tuple[dict[str, float], dict[str, list]]:
    """Sums of the weighted reward (and of each function's score when there are several) over the first `count`
    of the given rows (all of them by default; all are scored), and each function's scores of those rows."""
    rows = [held_out.rows[i] for i in indices]
    columns = {k: [r.get(k) for r in rows] for k in rows[0] if k != "prompt"} if rows else {}
    result = rewards([held_out.prompts[i] for i in indices], list(completions), columns, rows=rows)
    sums = {"reward": float(sum(result.total[:count]))}
    if len(result.per_function) > 1:
        for name, values in result.per_function.items():
            sums[f"reward/{name}"] = float(sum(v for v in values[:count] if v is not None))
    return sums, {name: list(values[:count]) for name, values in result.per_function.items()}


def separation(correct: Sequence[Optional[float]], scores: Mapping[str, Sequence[Optional[float]]]) -> dict[str, float]:
    """eval/auc/<name>: how well each learned or user reward function (not the built-in rules) ranks the policy's
    right answers above its wrong ones (ranking_auc over every rank's rows). A reward model near 1 still tells this
    policy's answers apart; near 0.5, a policy optimised against it has moved to mistakes it cannot see, and more
    steps against it gain nothing."""
    names = [name for name in scores if name not in REWARD_FUNCS]
    if not names:
        return {}
    mine = [(c, *(scores[name][i] for name in names)) for i, c in enumerate(correct) if c is not None]
    rows = [row for part in dist.gather_objects(mine) for row in part]
    out = {}
    for j, name in enumerate(names, start=1):
        scored = [(row[0], row[j]) for row in rows if row[j] is not None]
        auc = ranking_auc(torch.tensor([s for c, s in scored if c > 0.5], dtype=torch.float64),
                          torch.tensor([s for c, s in scored if c <= 0.5], dtype=torch.float64))
        if not torch.isnan(auc):
            out[f"eval/auc/{name}"] = float(auc)
    return out


def evaluate_policy(model, tokenizer, held_out: HeldOut, eval_cfg: DictConfig, synced_gpus: bool = False,
                    samples_file: Path | None = None, reference=None, rewards=None) -> dict[str, float]:
    """Greedy decoding on this rank's share of the held-out prompts; metrics reduced over ranks.

    With a `reference` model, eval/kl is the exact KL(policy || reference) summed over each greedy response's
    tokens (nats per response; see algos.kl.exact_kl). With `rewards` (a RewardSet), eval/reward is the mean
    weighted reward of the greedy responses and eval/reward/<name> each function's mean when there are several.
    """
    if len(held_out) == 0:
        return {}
    mine = list(range(dist.rank(), len(held_out), dist.world_size()))
    # Under ZeRO-3 every forward (generation, the reference's, the reward model's) is a collective, so every rank
    # runs the same batches: a rank whose share is one prompt short repeats one, and the repeat is not counted.
    width = -(-len(held_out) // dist.world_size())
    run, n = mine + [mine[0] if mine else 0] * (width - len(mine)), len(mine)
    params = SamplingParams(max_new_tokens=eval_cfg.max_new_tokens, greedy=True)
    responses = generate(model, [held_out.prompt_ids[i] for i in run], tokenizer.pad_token_id,
                         tokenizer.eos_token_id, params, eval_cfg.batch_size, synced_gpus=synced_gpus)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    sums, correct = score_completions(held_out, mine, texts[:n])
    if reference is not None:
        exp = build_experience([held_out.prompt_ids[i] for i in run], responses, tokenizer.pad_token_id,
                               tokenizer.eos_token_id, eval_cfg.max_new_tokens).to(dist.device())
        sums["kl"] = float(batched_response_kl(model, reference, exp, eval_cfg.batch_size)[:n].sum())
    per_function: dict[str, list] = {}
    if rewards is not None:
        reward_totals, per_function = reward_sums(rewards, held_out, run, texts, count=n)
        sums.update(reward_totals)
    responses, texts = responses[:n], texts[:n]
    sums["length"] = float(sum(len(r) for r in responses))
    sums["truncated"] = float(sum(tokenizer.eos_token_id not in r for r in responses))
    total = dist.all_reduce_sum(sums)
    n = max(total["n"], 1.0)
    metrics = {"eval/format_rate": total["format"] / n, "eval/response_length": total["length"] / n,
               "eval/truncation_rate": total["truncated"] / n}
    if total["n_answer"] > 0:
        metrics["eval/accuracy"] = total["correct"] / total["n_answer"]
    metrics.update({f"eval/{k}": v / n for k, v in total.items() if k == "kl" or k.startswith("reward")})
    if rewards is not None:
        metrics.update(separation(correct, per_function))
    if samples_file is not None and dist.is_main():
        with samples_file.open("w") as f:
            for i, text in list(zip(mine, texts))[:32]:
                f.write(json.dumps({"prompt": held_out.prompts[i], "completion": text,
                                    "answer": held_out.rows[i].get("answer")}) + "\n")
    return metrics
