"""What PPO and GRPO share: prompts, the policy and its frozen reference, sampling and scoring, the clipped
policy-loss update over mini-batches, and held-out evaluation. A stage adds its advantages (and PPO its critic).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch

from rlhf.algos.aggregation import aggregate, masked_sum
from rlhf.algos.kl import kl_penalty
from rlhf.algos.policy import clipped_policy_loss
from rlhf.algos.reward_shaping import overlong_penalty
from rlhf.data.loading import load_rows
from rlhf.data.sampler import StepSampler
from rlhf.data.tokenize import encode_rows, render_prompt
from rlhf.engine import distributed as dist
from rlhf.engine.engine import backward, build_engine, frozen_model, optimizer_step, zero_stage
from rlhf.errors import ConfigError, DataError
from rlhf.models.dropout import disable_dropout
from rlhf.models.zoo import load_policy, load_reference, load_tokenizer, training_model_config
from rlhf.rewards.combine import RewardSet
from rlhf.rewards.rules import check_columns
from rlhf.rollout.experience import Experience, build_experience, response_logprobs
from rlhf.rollout.generation import SamplingParams, generate, sample_seeds
from rlhf.trainers.base import Trainer
from rlhf.trainers.held_out import HeldOut, evaluate_policy
from rlhf.trainers.step_stats import StepStats

# Aggregations normalised by a count over the whole mini-batch (all micro-batches and ranks): their micro-batch
# losses are summed into the update, not averaged, so the update does not depend on how it is split.
STEP_NORMALISED = {"dapo", "grpo", "seq_mean_token_mean", "seq_mean_token_sum", "dr_grpo"}


@dataclass
class Samples:
    """Sampled responses before packing: token lists, one score per response, and the prompt row it answers."""

    prompt_ids: list[list[int]]
    responses: list[list[int]]
    rewards: list[float]
    rows: list[int]  # index of the prompt row of each response

    def take(self, index: list[int]) -> "Samples":
        return Samples(*([getattr(self, f)[i] for i in index] for f in ("prompt_ids", "responses", "rewards", "rows")))

    def __add__(self, other: "Samples") -> "Samples":
        return Samples(self.prompt_ids + other.prompt_ids, self.responses + other.responses,
                       self.rewards + other.rewards, self.rows + other.rows)


class RLTrainer(Trainer):
    """Subclasses set `samples_per_prompt`, `passes`, `mini_batches` and `needs_reference`, and implement
    `train_step` from `collect`, `update_batches` and `policy_loss`."""

    samples_per_prompt: int = 1
    passes: int = 1
    mini_batches: int = 1
    needs_reference: bool = True
    samples_label: str = ""  # how the batch line names the samples per prompt ("group " in GRPO)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.reward_totals = {"reward_errors": 0, "all_none": 0}
        self._warned_all_none = False
        self.vllm = None  # rollout.engine=vllm: the VLLMRollout built in setup

    def _check_sizes(self) -> None:
        t = self.cfg.trainer
        if t.prompts_per_step < self.world or t.prompts_per_step % self.world:
            raise ConfigError(f"trainer.prompts_per_step={t.prompts_per_step} must be a positive multiple of the "
                              f"world size {self.world}, so every process gets whole groups")
        per_rank = t.prompts_per_step // self.world * self.samples_per_prompt
        if per_rank % (self.mini_batches * t.micro_batch_size):
            raise ConfigError(
                f"each process samples {per_rank} responses per step, not a multiple of mini-batches "
                f"({self.mini_batches}) x trainer.micro_batch_size ({t.micro_batch_size}): change "
                "trainer.prompts_per_step, the samples per prompt or trainer.micro_batch_size")
        self.samples_per_rank = per_rank
        self.grad_accum = per_rank // self.mini_batches // t.micro_batch_size

    def batch_line(self) -> str:
        t = self.cfg.trainer
        return (f"batch: {t.prompts_per_step} prompts x {self.samples_label}{self.samples_per_prompt} = "
                f"{t.prompts_per_step * self.samples_per_prompt} samples/step; per process micro "
                f"{t.micro_batch_size} x accum {self.grad_accum} x world {self.world} per update; "
                f"{self.passes} pass(es) x {self.mini_batches} mini-batch(es) = "
                f"{self.passes * self.mini_batches} update(s) per step")

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
        check_columns(cfg.reward.funcs, self.rows[0], source)  # before the policy loads, not after sampling
        self.prompt_ids = [e.prompt_ids for e in encoded]
        self.prompt_texts = [render_prompt(r, self.tokenizer, cfg.data)[0] for r in self.rows]
        eval_rows = list(load_rows(cfg.data, "prompt", "eval", cfg.run.seed))
        self.held_out = HeldOut.build(eval_rows, self.tokenizer, cfg.data, cfg.eval.num_examples)
        self.sampler = StepSampler(len(self.rows), cfg.run.seed)
        policy = load_policy(training_model_config(cfg.model), self.tokenizer, cfg.run.seed)
        if cfg.trainer.disable_dropout and disable_dropout(policy):
            self._info("dropout switched off in the policy (trainer.disable_dropout): the update's log-probs are "
                       "those of the rollout")
        policy = self.adapt(policy)
        self.packs(policy)
        self.engine = build_engine(policy, cfg, self.world, grad_accum=self.grad_accum,
                                   optimizer_steps=cfg.trainer.max_steps * self.passes * self.mini_batches)
        self.engines = {"policy": self.engine}
        self.rewards = RewardSet.from_config(cfg.reward, dtype=cfg.model.dtype, batch_size=cfg.trainer.micro_batch_size,
                                             device=self.engine.device)
        scorer = self.rewards.model
        if scorer is not None:
            scorer.classifier = frozen_model(scorer.classifier, cfg, self.world, self.engine.device)
        self.reference = self.reference_for(self.engine, lambda: load_reference(
            cfg.model, self.tokenizer, cfg.run.seed)) if self.needs_reference else None
        frozen = [name for name, m in (("reference", self.reference),
                                       ("reward model", scorer.classifier if scorer is not None else None))
                  if m is not None and any(hasattr(p, "ds_id") for p in m.parameters())]  # ZeRO-3's parameters
        if frozen:
            self._info(f"{' and '.join(frozen)} partitioned over {self.world} process(es) (ZeRO-3 inference engine)")
        self.sampling = SamplingParams.from_config(cfg.rollout)
        self.shared_prefix = self.shares_prefixes()
        if cfg.rollout.engine == "vllm":
            from rlhf.rollout.vllm_engine import VLLMRollout  # imports vLLM: only when asked for

            self.vllm = VLLMRollout(self.engine.module, self.tokenizer, cfg.rollout, cfg.run.seed,
                                    cfg.data.max_prompt_length)

    # ---- experience --------------------------------------------------------------------------------
    def draw(self, count: int, stats: StepStats) -> Samples:
        """Sample and score this rank's share of the next `count` prompts of the data stream."""
        positions = self.sampler.rank_positions(self.samples_seen, count, dist.rank(), self.world)
        indices = self.sampler.indices(positions.start, len(positions))
        self.samples_seen += count
        return self.sample(indices, stats, positions)

    def sample(self, indices: list[int], stats: StepStats, positions: Sequence[int]) -> Samples:
        """Sample `samples_per_prompt` responses for each prompt row in `indices` (at global stream `positions`) and
        score them; the reward statistics of every sampled response are added to `stats` (they are what the policy
        produced)."""
        cfg, n = self.cfg, self.samples_per_prompt
        rows = [i for i in indices for _ in range(n)]
        prompts = [self.prompt_ids[i] for i in rows]
        seeds = sample_seeds(cfg.run.seed, positions, n) if cfg.rollout.seeded else None
        with stats.timed("generate_s"):
            if self.vllm is not None:
                self.vllm.sync(self.engine, self.engine.global_steps)  # after an update: the new weights
                responses = self.vllm.generate(prompts, self.sampling, seeds)
            else:
                responses = generate(self.engine.module, prompts, self.tokenizer.pad_token_id,
                                     self.tokenizer.eos_token_id, self.sampling, cfg.rollout.batch_size,
                                     synced_gpus=zero_stage(self.engine) == 3, seeds=seeds)
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        data = [self.rows[i] for i in rows]
        columns = {k: [r.get(k) for r in data] for k in data[0] if k != "prompt"}
        with stats.timed("reward_s"):
            scored = self.rewards([self.prompt_texts[i] for i in rows], texts, columns, rows=data)
        total = torch.tensor(scored.total, dtype=torch.float32)
        lengths = torch.tensor([len(r) for r in responses], dtype=torch.float32)
        truncated = self.truncated(responses).float()
        if cfg.reward.overlong_buffer > 0:
            penalty = overlong_penalty(lengths, self.sampling.max_new_tokens, cfg.reward.overlong_buffer,
                                       cfg.reward.overlong_penalty)
            total = total + penalty
            stats.add_function("overlong", float(penalty.sum()), float(len(responses)))
        stats.samples += len(total)
        stats.reward += float(total.sum())
        stats.reward_sq += float((total ** 2).sum())
        stats.length += float(lengths.sum())
        stats.length_max = max(stats.length_max, float(lengths.max()) if len(lengths) else 0.0)
        stats.truncated += float(truncated.sum())
        stats.all_none += scored.all_none
        stats.reward_errors += scored.errors
        if responses and scored.all_none == len(responses) and not self._warned_all_none:
            self._warned_all_none = True
            self._info(f"warning: no reward function in reward.funcs={list(cfg.reward.funcs)} applied to any of "
                       f"{len(responses)} completions (each returned None): they are all scored 0 and the step "
                       "learns nothing. Counted in reward/all_none; said once.")
        for name, values in scored.per_function.items():
            applied = [v for v in values if v is not None]
            stats.add_function(name, float(sum(applied)), float(len(applied)))
        return Samples(prompts, [list(r) for r in responses], total.tolist(), rows)

    def truncated(self, responses: list[list[int]]) -> torch.Tensor:
        """[N] bool: the response hit rollout.max_new_tokens without ending in EOS (as build_experience marks it)."""
        eos, limit = self.tokenizer.eos_token_id, self.sampling.max_new_tokens
        return torch.tensor([(not r or r[-1] != eos) and len(r) >= limit for r in responses], dtype=torch.bool)

    def pack(self, samples: Samples) -> Experience:
        """The padded experience of `samples`, its sequence rewards attached."""
        exp = build_experience(samples.prompt_ids, samples.responses, self.tokenizer.pad_token_id,
                               self.tokenizer.eos_token_id, self.sampling.max_new_tokens)
        exp.rewards = torch.tensor(samples.rewards, dtype=torch.float32)
        return exp

    # ---- update --------------------------------------------------------------------------------------
    def update_batches(self, exp: Experience, loss_mask: torch.Tensor) -> Iterator[tuple[Experience, torch.Tensor,
                                                                                        dict[str, float], bool]]:
        """(micro-batch, its loss mask, the token/sequence counts of its mini-batch over all ranks, whether it
        closes an update) for every pass and mini-batch. Mini-batches are shuffled when there are several."""
        mb, per_mini = self.cfg.trainer.micro_batch_size, len(exp) // self.mini_batches
        for _ in range(self.passes):
            order = torch.randperm(len(exp)) if self.mini_batches > 1 else torch.arange(len(exp))
            for m in range(self.mini_batches):
                index = order[m * per_mini:(m + 1) * per_mini]
                mask = loss_mask[index]
                counts = dist.all_reduce_sum({"tokens": float(mask.sum()), "seqs": float((mask.sum(-1) > 0).sum())})
                for start in range(0, per_mini, mb):
                    part = index[start:start + mb]
                    yield (exp.select(part).to(self.engine.device), loss_mask[part].to(self.engine.device), counts,
                           start + mb >= per_mini)

    def policy_loss(self, batch: Experience, mask: torch.Tensor, counts: dict[str, float], totals: StepStats,
                    *, epsilon: float, epsilon_high: Optional[float], loss_type: str, kl_coef: float = 0.0,
                    kl_estimator: str = "k3", entropy_coef: float = 0.0, dual_clip: Optional[float] = None,
                    ratio_level: str = "token") -> torch.Tensor:
        """The clipped-ratio loss of one micro-batch (plus kl_coef * KL to the reference and the entropy bonus),
        scaled so that the micro-batches of an update add up to its loss; statistics are added to `totals`."""
        logprobs, entropy = response_logprobs(self.engine, batch, self.cfg.rollout.temperature, with_entropy=True,
                                              shared_prefix=self.shared_prefix, entropy_grad=entropy_coef != 0)
        old = batch.old_logprobs if batch.old_logprobs is not None else logprobs.detach()
        per_token, stats = clipped_policy_loss(logprobs, old, batch.advantages, mask, epsilon, epsilon_high,
                                               dual_clip=dual_clip, ratio_level=ratio_level)
        if kl_coef > 0 and batch.ref_logprobs is not None:
            kl = kl_penalty(logprobs, batch.ref_logprobs, kl_estimator, mask)
            per_token = per_token + kl_coef * kl
            totals.kl += float(masked_sum(kl.detach(), mask))
        if entropy_coef:
            per_token = per_token - entropy_coef * entropy
        loss = aggregate(per_token, mask, loss_type, num_tokens=max(counts["tokens"], 1.0),
                         max_len=self.sampling.max_new_tokens, num_seqs=max(counts["seqs"], 1.0))
        n = float(mask.sum())
        totals.loss += loss.item()
        totals.entropy += float(masked_sum(entropy.detach(), mask))
        totals.clip_low += float(stats["clip_frac_low"]) * n
        totals.clip_high += float(stats["clip_frac_high"]) * n
        totals.approx_kl += float(stats["approx_kl"]) * n
        totals.tokens += n
        return loss * self.micro_batch_scale(loss_type)

    def micro_batch_scale(self, loss_type: str) -> float:
        """Factor on a micro-batch's loss before backward: DeepSpeed averages the micro-batches of an update over
        accumulation and ranks, so a step-normalised loss, whose micro-batch parts add up, is multiplied back."""
        return float(self.grad_accum * self.world) if loss_type in STEP_NORMALISED else 1.0

    def mean_loss(self, total: float, loss_type: str) -> float:
        """The mean per update of a loss whose micro-batch values (unscaled) were summed over the step and ranks."""
        per_update = self.grad_accum * self.world / self.micro_batch_scale(loss_type)
        return total / (self.passes * self.mini_batches * per_update)

    def policy_backward(self, loss: torch.Tensor) -> Optional[float]:
        backward(self.engine, loss)
        return optimizer_step(self.engine)

    # ---- metrics -------------------------------------------------------------------------------------
    def reduce(self, stats: StepStats) -> StepStats:
        """The step's statistics over every rank, its reward error and all-None counts added to the run's."""
        total = stats.reduced()
        self.reward_totals["reward_errors"] += int(total.reward_errors)
        self.reward_totals["all_none"] += int(total.all_none)
        return total

    # Completions over the whole run (resumed runs included) that a reward function raised on (scored
    # reward.error_score) or that no function applied to (scored 0): summary.json's reward_errors / reward_all_none.
    def extra_state(self) -> dict[str, Any]:
        return {"reward_totals": dict(self.reward_totals)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.reward_totals.update(state.get("reward_totals", {}))

    def summary(self, final_eval: dict[str, float]) -> dict[str, Any]:
        totals = self.reward_totals
        return {**super().summary(final_eval), "reward_errors": totals["reward_errors"],
                "reward_all_none": totals["all_none"]}

    def evaluate(self, final: bool = False) -> dict[str, float]:
        samples = self.run_dir / "eval_samples.jsonl" if final else None
        return evaluate_policy(self.engine.module, self.tokenizer, self.held_out, self.cfg.eval,
                               synced_gpus=zero_stage(self.engine) == 3, samples_file=samples,
                               reference=self.reference, rewards=self.rewards)
