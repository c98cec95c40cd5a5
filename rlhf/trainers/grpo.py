"""`rlhf grpo`: Group Relative Policy Optimization (DeepSeekMath, arXiv:2402.03300; DeepSeek-R1).

Each step: sample G responses for each prompt, score them, turn rewards into group-relative advantages, then
num_iterations times: clipped-ratio policy loss plus beta * k3 KL to the frozen reference, one optimizer update.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf.algos.advantages import ADVANTAGE_ESTIMATORS, zero_variance_groups
from rlhf.algos.aggregation import aggregate, masked_sum
from rlhf.algos.kl import kl_penalty
from rlhf.algos.policy import clipped_policy_loss
from rlhf.data.loading import load_rows
from rlhf.data.sampler import StepSampler
from rlhf.data.tokenize import encode_rows, render_prompt
from rlhf.engine import distributed as dist
from rlhf.engine.engine import build_engine, optimizer_step, zero_stage
from rlhf.errors import ConfigError, DataError
from rlhf.models.zoo import load_policy, load_reference, load_tokenizer
from rlhf.rewards.combine import RewardSet
from rlhf.rollout.experience import Experience, batched_logprobs, build_experience, response_logprobs
from rlhf.rollout.generation import SamplingParams, generate
from rlhf.trainers.base import Trainer
from rlhf.trainers.evaluation import HeldOut, evaluate_policy
from rlhf.trainers.sft import training_model_config

# Aggregations normalised by a count over the whole step: their micro-batch losses are summed, not averaged.
STEP_NORMALISED = {"dapo", "grpo", "seq_mean_token_mean", "seq_mean_token_sum", "dr_grpo"}


class GRPOTrainer(Trainer):
    stage = "grpo"

    def _check_sizes(self) -> None:
        t, a = self.cfg.trainer, self.cfg.algo
        if a.group_size < 2 and a.advantage != "reinforce_pp":
            raise ConfigError(f"algo.group_size={a.group_size}: group-relative advantages need at least 2 "
                              "responses per prompt (set algo.group_size>=2)")
        if t.prompts_per_step < self.world or t.prompts_per_step % self.world:
            raise ConfigError(f"trainer.prompts_per_step={t.prompts_per_step} must be a positive multiple of the "
                              f"world size {self.world}, so every process gets whole groups")
        per_rank = t.prompts_per_step // self.world * a.group_size
        if per_rank % t.micro_batch_size:
            raise ConfigError(f"each process samples {per_rank} responses per step, not a multiple of "
                              f"trainer.micro_batch_size={t.micro_batch_size}: change one of trainer.prompts_per_step, "
                              "algo.group_size or trainer.micro_batch_size")
        self.samples_per_rank = per_rank
        self.grad_accum = per_rank // t.micro_batch_size
        if a.epsilon <= 0 or (a.epsilon_high is not None and a.epsilon_high <= 0):
            raise ConfigError("algo.epsilon and algo.epsilon_high must be > 0")

    def batch_line(self) -> str:
        t, a = self.cfg.trainer, self.cfg.algo
        return (f"batch: {t.prompts_per_step} prompts x group {a.group_size} = "
                f"{t.prompts_per_step * a.group_size} samples/step; per process micro {t.micro_batch_size} x accum "
                f"{self.grad_accum} x world {self.world}; {a.num_iterations} update(s) per step")

    def setup(self) -> None:
        cfg = self.cfg
        self._check_sizes()
        self.tokenizer = load_tokenizer(cfg.model)
        source = cfg.data.path or f"built-in task {cfg.data.task!r}"
        rows = list(load_rows(cfg.data, "prompt", "train", cfg.run.seed))
        encoded, kept, dropped = encode_rows(rows, self.tokenizer, cfg.data, None, source)
        if not encoded:
            raise DataError(f"{source}: no prompts left after dropping {dropped} longer than "
                            f"data.max_prompt_length={cfg.data.max_prompt_length}")
        if dropped:
            self._info(f"dropped {dropped} of {len(rows)} prompts longer than data.max_prompt_length")
        self.rows = [rows[i] for i in kept]
        self.prompt_ids = [e.prompt_ids for e in encoded]
        self.prompt_texts = [render_prompt(r, self.tokenizer, cfg.data)[0] for r in self.rows]
        eval_rows = list(load_rows(cfg.data, "prompt", "eval", cfg.run.seed))
        self.held_out = HeldOut.build(eval_rows, self.tokenizer, cfg.data, cfg.eval.num_examples)
        self.sampler = StepSampler(len(self.rows), cfg.run.seed)
        self.rewards = RewardSet(cfg.reward.funcs, cfg.reward.weights, cfg.reward.on_error,
                                 cfg.reward.error_score, cfg.reward.time_limit_s)
        policy = load_policy(training_model_config(cfg.model), self.tokenizer, cfg.run.seed)
        self.engine = build_engine(policy, cfg, self.world, grad_accum=self.grad_accum,
                                   optimizer_steps=cfg.trainer.max_steps * cfg.algo.num_iterations)
        self.engines = {"policy": self.engine}
        # beta = 0 needs no reference: none is loaded (memory and a forward pass saved).
        self.reference = load_reference(cfg.model, self.tokenizer, cfg.run.seed).to(self.engine.device) \
            if cfg.algo.beta > 0 else None
        self.sampling = SamplingParams(cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_p,
                                       cfg.rollout.top_k)

    def rollout(self) -> tuple[Experience, dict[str, float]]:
        """Sample the groups of this rank's prompts, score them and attach advantages and log-probs."""
        cfg, a = self.cfg, self.cfg.algo
        G = a.group_size
        indices = self.sampler.rank_indices(self.samples_seen, cfg.trainer.prompts_per_step, dist.rank(), self.world)
        prompts = [self.prompt_ids[i] for i in indices for _ in range(G)]
        responses = generate(self.engine.module, prompts, self.tokenizer.pad_token_id, self.tokenizer.eos_token_id,
                             self.sampling, cfg.rollout.batch_size, synced_gpus=zero_stage(self.engine) == 3)
        exp = build_experience(prompts, responses, self.tokenizer.pad_token_id, self.tokenizer.eos_token_id,
                               cfg.rollout.max_new_tokens)
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        rows = [self.rows[i] for i in indices for _ in range(G)]
        columns = {k: [r.get(k) for r in rows] for k in rows[0] if k != "prompt"}
        scored = self.rewards([self.prompt_texts[i] for i in indices for _ in range(G)], texts, columns)
        exp.rewards = torch.tensor(scored.total, dtype=torch.float32)
        exp.advantages = ADVANTAGE_ESTIMATORS.get(a.advantage)(
            exp.rewards, G, scale=a.scale_rewards if a.advantage == "grpo" else None)
        flat = zero_variance_groups(exp.rewards, G).repeat_interleave(G) if G > 1 else torch.zeros(len(exp), dtype=torch.bool)
        keep = torch.ones(len(exp), dtype=torch.bool)
        if a.mask_truncated:
            keep &= ~exp.truncated
        if a.zero_variance == "skip":
            keep &= ~flat
        exp.extras["loss_mask"] = exp.action_mask * keep[:, None]
        if self.reference is not None:
            exp.ref_logprobs = batched_logprobs(self.reference, exp, cfg.trainer.micro_batch_size,
                                                cfg.rollout.temperature)
        if a.num_iterations > 1:  # with one pass the old policy is the current one: ratio 1, nothing to compute
            exp.old_logprobs = batched_logprobs(self.engine.module, exp, cfg.trainer.micro_batch_size,
                                                cfg.rollout.temperature)
        lengths = exp.action_mask.sum(-1)
        sums = {"reward": float(exp.rewards.sum()), "reward_sq": float((exp.rewards ** 2).sum()),
                "n": float(len(exp)), "zero_var": float(flat.sum()) / G, "groups": float(len(indices)),
                "length": float(lengths.sum()), "truncated": float(exp.truncated.sum()),
                "all_none": float(scored.all_none)}
        for name, values in scored.per_function.items():
            applied = [v for v in values if v is not None]
            sums[f"fn/{name}"], sums[f"fn_n/{name}"] = float(sum(applied)), float(len(applied))
        return exp, sums

    def train_step(self) -> dict[str, Any]:
        cfg, a = self.cfg, self.cfg.algo
        exp, sums = self.rollout()
        loss_mask = exp.extras["loss_mask"]
        counts = dist.all_reduce_sum({"tokens": float(loss_mask.sum()),
                                      "seqs": float((loss_mask.sum(-1) > 0).sum())})
        scale = self.grad_accum * self.world if a.loss_type in STEP_NORMALISED else 1.0
        mb = cfg.trainer.micro_batch_size
        totals = {"loss": 0.0, "kl": 0.0, "entropy": 0.0, "clip_low": 0.0, "clip_high": 0.0, "tokens": 0.0}
        grad_norm = None
        for _ in range(a.num_iterations):
            for start in range(0, len(exp), mb):
                batch = exp.select(range(start, start + mb)).to(self.engine.device)
                mask = loss_mask[start:start + mb].to(self.engine.device)
                logprobs, entropy = response_logprobs(self.engine, batch, cfg.rollout.temperature, with_entropy=True)
                old = batch.old_logprobs if batch.old_logprobs is not None else logprobs.detach()
                per_token, stats = clipped_policy_loss(logprobs, old, batch.advantages, mask, a.epsilon,
                                                       a.epsilon_high, ratio_level=a.ratio_level)
                if batch.ref_logprobs is not None:
                    kl = kl_penalty(logprobs, batch.ref_logprobs, "k3")
                    per_token = per_token + a.beta * kl
                    totals["kl"] += float(masked_sum(kl.detach(), mask))
                loss = aggregate(per_token, mask, a.loss_type, num_tokens=max(counts["tokens"], 1.0),
                                 max_len=cfg.rollout.max_new_tokens, num_seqs=max(counts["seqs"], 1.0))
                self.engine.backward(loss * scale)
                grad_norm = optimizer_step(self.engine)
                n = float(mask.sum())
                totals["loss"] += loss.item()
                totals["entropy"] += float(masked_sum(entropy, mask))
                totals["clip_low"] += float(stats["clip_frac_low"]) * n
                totals["clip_high"] += float(stats["clip_frac_high"]) * n
                totals["tokens"] += n
        self.samples_seen += cfg.trainer.prompts_per_step
        self.last_metrics = self._metrics(dist.all_reduce_sum({**sums, **totals}), grad_norm)
        return self.last_metrics

    def _metrics(self, s: dict[str, float], grad_norm: float | None) -> dict[str, Any]:
        a = self.cfg.algo
        n, tokens = max(s["n"], 1.0), max(s["tokens"], 1.0)
        mean = s["reward"] / n
        # Step-normalised losses of the micro-batches add up to the step's loss; bnpo's are averaged.
        per_update = 1 if a.loss_type in STEP_NORMALISED else self.grad_accum * self.world
        out = {"loss": s["loss"] / (a.num_iterations * per_update),
               "reward/mean": mean, "reward/std": max(s["reward_sq"] / n - mean ** 2, 0.0) ** 0.5,
               "reward/zero_variance_frac": s["zero_var"] / max(s["groups"], 1.0),
               "reward/all_none": s["all_none"], "entropy": s["entropy"] / tokens,
               "clip_frac/low": s["clip_low"] / tokens, "clip_frac/high": s["clip_high"] / tokens,
               "response/length_mean": s["length"] / n, "response/truncation_rate": s["truncated"] / n,
               "grad_norm": grad_norm}
        if self.reference is not None:
            out["kl/k3"] = s["kl"] / tokens
        for key in [k for k in s if k.startswith("fn/")]:
            name = key.removeprefix("fn/")
            out[f"reward/{name}"] = s[key] / max(s[f"fn_n/{name}"], 1.0)
        return out

    def summary(self, final_eval: dict[str, float]) -> dict[str, Any]:
        last = getattr(self, "last_metrics", {})
        return {**super().summary(final_eval), "kl": last.get("kl/k3"), "reward": last.get("reward/mean")}

    def evaluate(self, final: bool = False) -> dict[str, float]:
        samples = self.run_dir / "eval_samples.jsonl" if final else None
        return evaluate_policy(self.engine.module, self.tokenizer, self.held_out, self.cfg.eval,
                               synced_gpus=zero_stage(self.engine) == 3, samples_file=samples)
