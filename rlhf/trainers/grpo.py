"""`rlhf grpo`: Group Relative Policy Optimization (DeepSeekMath, arXiv:2402.03300; DeepSeek-R1).

Each step: sample G responses for each prompt, score them, turn rewards into group-relative advantages, then
num_iterations times: clipped-ratio policy loss plus beta * k3 KL to the frozen reference, one optimizer update.
"""

from __future__ import annotations

import math

from typing import Any

import torch

from rlhf.algos.advantages import ADVANTAGE_ESTIMATORS, zero_variance_groups
from rlhf.engine import distributed as dist
from rlhf.rollout.experience import batched_logprobs
from rlhf.trainers.rl import RLTrainer, Samples
from rlhf.trainers.step_stats import GRPOStepStats

class GRPOTrainer(RLTrainer):
    stage = "grpo"
    samples_label = "group "

    def _check_sizes(self) -> None:
        a = self.cfg.algo
        # choices, ranges and the group size are checked when the config is composed (rlhf.config)
        self.samples_per_prompt, self.passes = a.group_size, a.num_iterations
        self.needs_reference = a.beta > 0  # beta = 0 needs no reference: none is loaded
        super()._check_sizes()

    def setup(self) -> None:
        super().setup()
        a = self.cfg.algo
        if a.ratio_level == "sequence" and a.loss_type != "grpo":
            self._info(f"warning: algo.ratio_level=sequence (GSPO) is defined with a per-response mean of the token "
                       f"losses (algo.loss_type=grpo); algo.loss_type={a.loss_type} weighs the responses by their "
                       "length instead")

    def collect(self, stats: GRPOStepStats) -> tuple[Samples, torch.Tensor]:
        """This rank's groups for the step and a [N] mask of the responses that enter the loss.

        With zero_variance=resample (DAPO's dynamic sampling) flat groups are dropped and more prompts are drawn,
        up to resample_rounds extra rounds, until every rank has its quota of groups with signal; every rank
        runs the same number of rounds (generation under ZeRO-3 is a collective)."""
        cfg, a = self.cfg, self.cfg.algo
        G, per_rank = a.group_size, cfg.trainer.prompts_per_step // self.world
        draw = cfg.trainer.prompts_per_step
        if a.zero_variance == "resample":
            draw = math.ceil(draw * a.oversample / self.world) * self.world
        kept, flat, rounds = None, None, 0
        while True:
            drawn = self.draw(draw, stats)
            prompts = len(drawn.rewards) // G
            is_flat = zero_variance_groups(torch.tensor(drawn.rewards), G) if G > 1 else \
                torch.zeros(prompts, dtype=torch.bool)
            stats.zero_variance += float(is_flat.sum())
            stats.groups += prompts
            if a.zero_variance != "resample":
                return drawn, self._keep_mask(drawn, is_flat.repeat_interleave(G))
            groups = [range(g * G, (g + 1) * G) for g in range(prompts)]
            good = [i for g, r in zip(is_flat.tolist(), groups) if not g for i in r]
            bad = [i for g, r in zip(is_flat.tolist(), groups) if g for i in r]
            kept = drawn.take(good) if kept is None else kept + drawn.take(good)
            flat = drawn.take(bad) if flat is None else flat + drawn.take(bad)
            short = max(per_rank * G - len(kept.rewards), 0)
            if dist.all_reduce_sum({"short": float(short)})["short"] == 0 or rounds >= a.resample_rounds:
                break
            rounds += 1
        stats.resample_rounds = float(rounds)
        fill = flat.take(list(range(min(short, len(flat.rewards)))))
        samples = kept.take(list(range(min(len(kept.rewards), per_rank * G)))) + fill
        is_filler = torch.tensor([False] * (len(samples.rewards) - len(fill.rewards)) + [True] * len(fill.rewards))
        return samples, self._keep_mask(samples, is_filler)

    def _keep_mask(self, samples: Samples, flat: torch.Tensor) -> torch.Tensor:
        a = self.cfg.algo
        keep = torch.ones(len(samples.rewards), dtype=torch.bool)
        if a.zero_variance != "keep":
            keep &= ~flat
        if a.mask_truncated:
            keep &= ~self.truncated(samples.responses)
        return keep

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """algo.advantage over the step's groups; algo.scale_rewards=null leaves the estimator's own scale (group for
        grpo, none for rloo, batch for reinforce_pp), a set one applies to every estimator."""
        a = self.cfg.algo
        return ADVANTAGE_ESTIMATORS.get(a.advantage)(rewards, a.group_size, scale=a.scale_rewards,
                                                     reduce=dist.batch_reducer())

    def train_step(self) -> dict[str, Any]:
        cfg, a = self.cfg, self.cfg.algo
        stats = GRPOStepStats()
        samples, keep = self.collect(stats)
        exp = self.pack(samples)
        # Resampling keeps whole groups only, so the advantages of a group are computed among its own samples.
        exp.advantages = self.advantages(exp.rewards)
        loss_mask = exp.action_mask * keep[:, None]
        with stats.timed("logprob_s"):
            if self.reference is not None:
                exp.ref_logprobs = batched_logprobs(self.reference, exp, cfg.trainer.micro_batch_size,
                                                    cfg.rollout.temperature, self.shared_prefix)
            if self.passes > 1:  # with one pass the old policy is the current one: ratio 1, nothing to compute
                exp.old_logprobs = batched_logprobs(self.engine.module, exp, cfg.trainer.micro_batch_size,
                                                    cfg.rollout.temperature, self.shared_prefix)
        grad_norm = None
        with stats.timed("train_s"):
            for batch, mask, counts, _ in self.update_batches(exp, loss_mask):
                loss = self.policy_loss(batch, mask, counts, stats, epsilon=a.epsilon, epsilon_high=a.epsilon_high,
                                        loss_type=a.loss_type, kl_coef=a.beta, kl_estimator=a.kl_estimator,
                                        entropy_coef=a.entropy_coef, ratio_level=a.ratio_level)
                norm = self.policy_backward(loss)
                grad_norm = grad_norm if norm is None else norm
        s = self.reduce(stats)
        out = s.metrics(self.mean_loss(s.loss, a.loss_type), kl_name=a.kl_estimator if self.reference else None,
                        resampled=a.zero_variance == "resample", world=self.world)
        out["grad_norm"] = grad_norm
        self.last_metrics = out
        return out

    def summary(self, final_eval: dict[str, float]) -> dict[str, Any]:
        last = getattr(self, "last_metrics", {})
        # kl: the exact KL to the reference on the held-out answers when measured, else the last step's k3 estimate
        return {**super().summary(final_eval),
                "kl": final_eval.get("eval/kl", last.get(f"kl/{self.cfg.algo.kl_estimator}")),
                "reward": last.get("reward/mean")}

