"""What one RL step measured, as a typed record: sums that add up over micro-batches and ranks, one collective to
reduce them, and the one place that names the metric keys a step logs."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterator, Optional

from rlhf.engine import distributed as dist

MAX = {"reduce": "max"}
"""Field metadata of a maximum over ranks: the longest response, and the phases' seconds (ranks run them at once)."""


def variance(total: float, total_sq: float, n: float) -> float:
    """Population variance from a sum and a sum of squares (as all-reduced over ranks)."""
    return max(total_sq / n - (total / n) ** 2, 0.0) if n > 0 else 0.0


@dataclass
class StepStats:
    """The sampling, reward and policy-loss side of an RL step on this rank."""

    samples: float = 0.0  # responses sampled: every one, flat groups included (what the policy produced)
    reward: float = 0.0
    reward_sq: float = 0.0
    length: float = 0.0
    truncated: float = 0.0
    all_none: float = 0.0  # completions no reward function applied to (scored 0)
    reward_errors: float = 0.0  # completions scored reward.error_score because a function raised
    tokens: float = 0.0  # response tokens in the policy loss, over every pass
    loss: float = 0.0  # the micro-batch losses as computed (before the backward scale), summed
    entropy: float = 0.0
    clip_low: float = 0.0
    clip_high: float = 0.0
    approx_kl: float = 0.0
    kl: float = 0.0  # the KL loss term's estimate, over its tokens
    length_max: float = field(default=0.0, metadata=MAX)
    generate_s: float = field(default=0.0, metadata=MAX)
    logprob_s: float = field(default=0.0, metadata=MAX)
    reward_s: float = field(default=0.0, metadata=MAX)
    train_s: float = field(default=0.0, metadata=MAX)
    functions: dict[str, list[float]] = field(default_factory=dict)  # reward name -> [sum of values, count]

    def add_function(self, name: str, total: float, count: float) -> None:
        sums = self.functions.setdefault(name, [0.0, 0.0])
        sums[0] += total
        sums[1] += count

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Add the seconds the block takes to the phase's field (time/<phase> in the metrics)."""
        began = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, phase, getattr(self, phase) + time.perf_counter() - began)

    def reduced(self) -> "StepStats":
        """The step's statistics over every rank: one all-reduce of the sums, one per maximum."""
        scalars = [f for f in fields(self) if f.name != "functions"]
        sums = {f.name: getattr(self, f.name) for f in scalars if f.metadata != MAX}
        for name, (total, count) in self.functions.items():
            sums[f"fn/{name}"], sums[f"fn_n/{name}"] = total, count
        total = dist.all_reduce_sum(sums)
        out = replace(self, **{f.name: (dist.all_reduce_max(getattr(self, f.name)) if f.metadata == MAX
                                        else total[f.name]) for f in scalars})
        out.functions = {name: [total[f"fn/{name}"], total[f"fn_n/{name}"]] for name in self.functions}
        return out

    def metrics(self, loss: float) -> dict[str, Any]:
        """The step's metrics (from reduced statistics); `loss` is the mean loss per update, which only the trainer
        can scale back (it depends on how the step was split)."""
        n, tokens = max(self.samples, 1.0), max(self.tokens, 1.0)
        mean = self.reward / n
        out = {"loss": loss, "reward/mean": mean, "reward/std": variance(self.reward, self.reward_sq, n) ** 0.5,
               "reward/all_none": self.all_none, "reward/errors": self.reward_errors, "entropy": self.entropy / tokens,
               "clip_frac/low": self.clip_low / tokens, "clip_frac/high": self.clip_high / tokens,
               "policy/approx_kl": self.approx_kl / tokens, "response/length_mean": self.length / n,
               "response/length_max": self.length_max, "response/truncation_rate": self.truncated / n,
               "time/generate_s": self.generate_s, "time/logprob_s": self.logprob_s, "time/reward_s": self.reward_s,
               "time/train_s": self.train_s, "perf/completions_per_s": self.samples / max(self.generate_s, 1e-9)}
        for name, (total, count) in self.functions.items():
            out[f"reward/{name}"] = total / max(count, 1.0)
        return out


@dataclass
class GRPOStepStats(StepStats):
    groups: float = 0.0  # groups sampled, every round
    zero_variance: float = 0.0  # of them, groups whose rewards all agree
    resample_rounds: float = 0.0  # extra sampling rounds (zero_variance=resample), summed over ranks

    def metrics(self, loss: float, kl_name: Optional[str] = None, resampled: bool = False,
                world: int = 1) -> dict[str, Any]:
        out = super().metrics(loss)
        out["reward/zero_variance_frac"] = self.zero_variance / max(self.groups, 1.0)
        if resampled:
            out["reward/resample_rounds"] = self.resample_rounds / world
        if kl_name is not None:
            out[f"kl/{kl_name}"] = self.kl / max(self.tokens, 1.0)
        return out


@dataclass
class PPOStepStats(StepStats):
    score: float = 0.0  # sequence scores as shaped (clipped, cut, penalised, whitened), per response
    shaped: float = 0.0  # per-token rewards, KL penalty included
    value: float = 0.0
    returns: float = 0.0
    returns_sq: float = 0.0
    residual: float = 0.0  # returns - values
    residual_sq: float = 0.0
    advantage: float = 0.0
    action_tokens: float = 0.0
    value_loss: float = 0.0
    value_clip: float = 0.0
    value_tokens: float = 0.0
    kl_k1: float = 0.0  # KL to the reference at sampling time, summed over each response's tokens
    kl_k2: float = 0.0
    kl_k3: float = 0.0

    def metrics(self, loss: float, value_loss: float = 0.0, kl_names: tuple[str, ...] = ()) -> dict[str, Any]:
        out = super().metrics(loss)
        n, tokens = max(self.samples, 1.0), max(self.action_tokens, 1.0)
        returns_var = variance(self.returns, self.returns_sq, tokens)
        out.update({"reward/score": self.score / n, "reward/shaped": self.shaped / n,
                    # 1 - Var(R - V) / Var(R): 1 = the critic predicts returns, <= 0 = no better than a constant
                    "value/explained_variance": 1.0 - variance(self.residual, self.residual_sq, tokens) / returns_var
                    if returns_var > 0 else 0.0,
                    "value/mean": self.value / tokens, "value/return": self.returns / tokens,
                    "value/advantage": self.advantage / tokens, "value/loss": value_loss,
                    "value/clip_frac": self.value_clip / max(self.value_tokens, 1.0)})
        for name in kl_names:
            out[f"kl/{name}"] = getattr(self, f"kl_{name}") / n  # per response, summed over its tokens
        return out
