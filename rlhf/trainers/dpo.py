"""`rlhf dpo`: direct preference optimisation (Rafailov et al. 2023, arXiv:2305.18290) and its relatives.

Each step: the step's preference pairs, each as [prompt | chosen] and [prompt | rejected]; the summed log-probs of
both responses under the policy and under the frozen reference (none for the reference-free simpo); the loss
algo.loss_type names over the implicit rewards beta * (log pi - log pi_ref); one optimizer update. The data are
train-rm's (pairs, conversational and TRL layouts; a ranked list gives its best response against each other one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from rlhf.algos.aggregation import masked_sum
from rlhf.algos.dpo import DPO_LOSSES, implicit_rewards, simpo_loss
from rlhf.data.loading import load_rows
from rlhf.data.sampler import StepSampler
from rlhf.engine import distributed as dist
from rlhf.engine.engine import backward, build_engine, optimizer_step, zero_stage
from rlhf.errors import DataError
from rlhf.models.dropout import disable_dropout
from rlhf.models.zoo import load_policy, load_reference, load_tokenizer, training_model_config
from rlhf.rewards.preferences import load_preferences, rank_share
from rlhf.rollout.experience import Experience, build_experience, response_logprobs
from rlhf.trainers.base import Trainer
from rlhf.trainers.held_out import HeldOut, evaluate_policy


@dataclass
class Pair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    reference: Optional[tuple[float, float]] = None  # the reference's summed log-probs of (chosen, rejected), cached

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


def pairs_of(examples) -> list[Pair]:
    """Preference rows as pairs: a list's best response against each of the others."""
    return [Pair(e.prompt_ids, e.response_ids[0], other) for e in examples for other in e.response_ids[1:]]


def pair_experience(pairs: Sequence[Pair], pad_id: int, eos_id: Optional[int]) -> Experience:
    """Rows chosen, rejected, chosen, rejected, ... in the rollout layout (left-padded prompt | response)."""
    prompts = [p.prompt_ids for p in pairs for _ in range(2)]
    responses = [r for p in pairs for r in (p.chosen_ids, p.rejected_ids)]
    return build_experience(prompts, responses, pad_id, eos_id, max(len(r) for r in responses) + 1)


def sequence_logprobs(model, exp: Experience, shared_prefix: bool) -> torch.Tensor:
    """Summed log-probs of each row's response, [B]."""
    logprobs, _ = response_logprobs(model, exp, shared_prefix=shared_prefix)
    return masked_sum(logprobs, exp.action_mask, dim=-1)


class DPOTrainer(Trainer):
    stage = "dpo"

    def setup(self) -> None:
        cfg, algo = self.cfg, self.cfg.algo
        self.tokenizer = load_tokenizer(cfg.model)
        self.train = pairs_of(load_preferences(cfg, "train", self.tokenizer, algo.on_invalid, self._info))
        self.eval_pairs = pairs_of(load_preferences(cfg, "eval", self.tokenizer, algo.on_invalid, self._info))
        self.eval_pairs = self.eval_pairs[:cfg.eval.num_examples or None]
        if not self.train:
            raise DataError(f"{cfg.data.path or 'the built-in task'}: no preference pairs to train on")
        self.lengths = [p.length for p in self.train]
        self.sampler = StepSampler(len(self.train), cfg.run.seed)
        # The built-in task's held-out problems: the policy's own answers, scored as every policy stage's are.
        self.held_out = HeldOut.build(list(load_rows(cfg.data, "prompt", "eval", cfg.run.seed)), self.tokenizer,
                                      cfg.data, cfg.eval.num_examples) if cfg.data.path is None else None
        policy = load_policy(training_model_config(cfg.model), self.tokenizer, cfg.run.seed)
        if cfg.trainer.disable_dropout:
            disable_dropout(policy)
        policy = self.adapt(policy)
        self.packs(policy)
        self.engine = build_engine(policy, cfg, self.world)
        self.engines = {"policy": self.engine}
        self.reference = None if algo.loss_type == "simpo" else self.reference_for(
            self.engine, lambda: load_reference(cfg.model, self.tokenizer, cfg.run.seed))
        self.shared_prefix = self.shares_prefixes()
        if self.reference is not None and algo.precompute_reference:
            self.cache_reference()

    def cache_reference(self) -> None:
        """The reference's log-probs of every pair, from the run's reference_logps.pt when it holds them (a resumed
        run), else computed now (every process computes all of them: the same passes on every rank, as ZeRO-3's
        collectives need) and saved; then the reference is freed."""
        pairs = self.train + self.eval_pairs
        path = self.run_dir / "reference_logps.pt"
        cached = torch.load(path) if path.is_file() else None
        if cached is None or cached.shape != (len(pairs), 2):
            size, parts = self.cfg.eval.batch_size, []
            for start in range(0, len(pairs), size):
                exp = pair_experience(pairs[start:start + size], self.tokenizer.pad_token_id,
                                      self.tokenizer.eos_token_id).to(self.engine.device)
                with torch.no_grad():
                    parts.append(sequence_logprobs(self.reference, exp, self.shared_prefix).view(-1, 2).cpu())
            cached = torch.cat(parts)
            if dist.rank() == 0:
                tmp = path.with_suffix(".tmp")
                torch.save(cached, tmp)
                tmp.replace(path)
            self._info(f"reference log-probs of {len(pairs)} pairs computed and kept in {path}; the reference is freed")
        for pair, (chosen, rejected) in zip(pairs, cached.tolist()):
            pair.reference = (chosen, rejected)
        self.reference = None

    def losses(self, pairs: Sequence[Pair], model, grad: bool,
               real: Optional[int] = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Per-pair losses [B] and the sums of their implicit rewards (chosen, rejected, correct) over the first
        `real` pairs (all of them by default: the rest pad a rank's share)."""
        algo = self.cfg.algo
        exp = pair_experience(pairs, self.tokenizer.pad_token_id, self.tokenizer.eos_token_id).to(self.engine.device)
        with torch.set_grad_enabled(grad):
            logps = sequence_logprobs(model, exp, self.shared_prefix)
        chosen, rejected = logps[0::2], logps[1::2]
        if algo.loss_type == "simpo":  # reference-free: none is loaded
            lengths = exp.action_mask.sum(-1)
            loss = simpo_loss(chosen, rejected, lengths[0::2], lengths[1::2], beta=algo.beta,
                              gamma_beta_ratio=algo.simpo_gamma_beta_ratio, label_smoothing=algo.label_smoothing)
            ref_chosen = ref_rejected = torch.zeros_like(chosen)
        else:
            if pairs[0].reference is not None:  # algo.precompute_reference
                ref = torch.tensor([p.reference for p in pairs], dtype=logps.dtype, device=logps.device).flatten()
            else:
                with torch.no_grad():
                    ref = sequence_logprobs(self.reference, exp, self.shared_prefix)
            ref_chosen, ref_rejected = ref[0::2], ref[1::2]
            loss = DPO_LOSSES.get(algo.loss_type)(chosen, rejected, ref_chosen, ref_rejected, beta=algo.beta,
                                                  label_smoothing=algo.label_smoothing)
        n = len(pairs) if real is None else real
        r_chosen = implicit_rewards(chosen.detach()[:n], ref_chosen[:n], algo.beta)
        r_rejected = implicit_rewards(rejected.detach()[:n], ref_rejected[:n], algo.beta)
        sums = {"pairs": float(n), "loss": float(loss.detach()[:n].sum()), "chosen": float(r_chosen.sum()),
                "rejected": float(r_rejected.sum()), "correct": float((r_chosen > r_rejected).sum())}
        return loss, sums

    def train_step(self) -> dict[str, Any]:
        t = self.cfg.trainer
        indices = self.sampler.rank_indices(self.samples_seen, self.global_batch, dist.rank(), self.world)
        totals: dict[str, float] = {}
        grad_norm = None
        for part in self.micro_batches(indices, self.lengths):
            loss, sums = self.losses([self.train[i] for i in part], self.engine, grad=True)
            # the mean over the step's pairs: DeepSpeed divides by grad_accum and averages over ranks, undone here
            backward(self.engine, loss.sum() / self.global_batch * t.grad_accum * self.world)
            grad_norm = optimizer_step(self.engine)
            totals = {k: totals.get(k, 0.0) + v for k, v in sums.items()}
        self.samples_seen += self.global_batch
        return {**self.pair_metrics(dist.all_reduce_sum(totals), ""), "grad_norm": grad_norm}

    @staticmethod
    def pair_metrics(total: dict[str, float], prefix: str) -> dict[str, float]:
        n = max(total["pairs"], 1.0)
        return {f"{prefix}loss": total["loss"] / n, f"{prefix}rewards/chosen": total["chosen"] / n,
                f"{prefix}rewards/rejected": total["rejected"] / n,
                f"{prefix}rewards/margin": (total["chosen"] - total["rejected"]) / n,
                f"{prefix}rewards/accuracy": total["correct"] / n}

    @torch.no_grad()
    def evaluate(self, final: bool = False) -> dict[str, float]:
        module = self.engine.module
        was_training = module.training
        module.eval()
        metrics: dict[str, float] = {}
        if self.eval_pairs:
            # every rank the same number of pairs, and so of forward passes (ZeRO-3's are collectives); the repeats
            # that pad a rank's share are not counted
            mine, real = rank_share(self.eval_pairs)
            size, totals = self.cfg.eval.batch_size, {}
            for start in range(0, len(mine), size):
                _, sums = self.losses(mine[start:start + size], module, grad=False,
                                      real=min(max(real - start, 0), size))
                totals = {k: totals.get(k, 0.0) + v for k, v in sums.items()}
            metrics.update(self.pair_metrics(dist.all_reduce_sum(totals), "eval/"))
        module.train(was_training)
        if self.held_out is not None:
            samples = self.run_dir / "eval_samples.jsonl" if final else None
            metrics.update(evaluate_policy(module, self.tokenizer, self.held_out, self.cfg.eval,
                                           synced_gpus=zero_stage(self.engine) == 3, samples_file=samples))
        return metrics

    def summary(self, final_eval: dict[str, float]) -> dict[str, Any]:
        return {k.replace("/", "_"): v for k, v in super().summary(final_eval).items()}
