"""Numeric guards: an optimizer step whose loss or gradient is not finite is skipped, counted and logged,
and a run that keeps producing them stops with an error instead of training on NaN.

How a step is skipped without desynchronising DeepSpeed (its micro-step counters and ZeRO's gradient hooks
expect one backward per micro-batch): a non-finite micro-batch loss is replaced by `0 * sum(parameters)`,
whose gradient is exactly zero, and the step's update runs with learning rate 0, so no weight changes
(Adam's moment estimates decay by one step). Under ZeRO-3 parameters are partitioned and cannot stand in
for the loss: there the first non-finite loss stops the run.
"""

from __future__ import annotations

import math

import torch

from rlhf.engine import distributed as dist
from rlhf.errors import RLHFError


class StepGuard:
    def __init__(self, max_bad_steps: int, zero_stage: int = 0):
        self.max_bad_steps = max_bad_steps
        self.zero_stage = zero_stage
        self.reason: str | None = None  # what was non-finite in the current step
        self.consecutive = 0
        self.total = 0

    def checked_loss(self, engine, loss: torch.Tensor, what: str = "loss") -> torch.Tensor:
        """The loss to back-propagate: `loss`, or a zero-gradient stand-in when it is not finite on any rank."""
        bad = dist.all_reduce_sum({"bad": float(not bool(torch.isfinite(loss.detach()).all()))})["bad"] > 0
        if not bad:
            return loss
        self.reason = self.reason or f"{what} ({loss.detach().float().reshape(-1)[0].item()})"
        if self.zero_stage == 3:
            raise RLHFError(f"non-finite {self.reason}; under ZeRO-3 a step cannot be skipped, so the run stops here "
                            "(the last checkpoint is intact)")
        params = [p for p in engine.module.parameters() if p.requires_grad]
        return sum((p.sum() * 0.0 for p in params), torch.zeros((), device=loss.device))

    def gradient_norm(self, norm: float | None) -> None:
        """Record a non-finite gradient norm measured before the update (ZeRO-0 fp32, where it is computed first)."""
        if norm is not None and not math.isfinite(norm):
            self.reason = self.reason or f"gradient norm ({norm})"

    @property
    def skip(self) -> bool:
        return self.reason is not None

    def end_step(self, step: int) -> dict[str, float]:
        """Count the step (good or skipped); stop the run after max_bad_steps skipped steps in a row."""
        reason, self.reason = self.reason, None
        if reason is None:
            self.consecutive = 0
            return {}
        self.consecutive += 1
        self.total += 1
        if self.consecutive > self.max_bad_steps:
            raise RLHFError(f"step {step}: non-finite {reason}, {self.consecutive} steps in a row (guard.max_bad_steps="
                            f"{self.max_bad_steps}); stopping. The last checkpoint is intact: lower trainer.lr or check "
                            "the data and rewards, then resume with run.resume=true")
        return {"guard/skipped": 1.0, "guard/skipped_total": float(self.total)}


def step_with_lr_zero(engine) -> None:
    """engine.step() with every learning rate at 0 for this update (the scheduler then sets the next one)."""
    groups = engine.optimizer.param_groups
    saved = [g["lr"] for g in groups]
    for g in groups:
        g["lr"] = 0.0
    try:
        engine.step()
    finally:
        for g, lr in zip(groups, saved):
            if g["lr"] == 0.0:
                g["lr"] = lr
