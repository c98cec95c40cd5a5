"""`rlhf train-rm`: a Bradley-Terry reward model on preferences (pairs, or ranked lists of K responses).

Each step: every response of the step's preference rows goes through the model in one forward pass per
micro-batch, the scores are regrouped into lists [N, K] (best first), and the pairwise (Bradley-Terry) or
listwise (Plackett-Luce) loss of each list is summed and divided by the step's number of lists.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import torch

from rlhf.algos.logprobs import token_logprobs
from rlhf.data.sampler import StepSampler
from rlhf.engine import checkpoint as ckpt
from rlhf.engine import distributed as dist
from rlhf.engine.engine import backward, build_engine, configured_zero_stage, optimizer_step
from rlhf.errors import ConfigError
from rlhf.models.zoo import load_reward_model, load_tokenizer, prepare_for_training, training_model_config
from rlhf.rewards.model import (
    INFO_FILE,
    RewardModelInfo,
    check_score,
    collate_preferences,
    has_token_head,
    head_rewards,
    hidden_states,
    list_scores,
    packed_hidden_states,
    read_scores,
    score_preferences,
    sequence_scores,
)
from rlhf.rewards.preferences import (
    evaluate_preferences,
    list_losses,
    load_preferences,
    preference_metrics,
    preference_sums,
    rank_share,
)
from rlhf.trainers.base import Trainer


DEFAULT_LM_COEF = 2.0
"""algo.lm_coef=null's weight. The default `rlhf train-rm` from scratch on the built-in preferences, held-out pairwise
accuracy (seed 0 / 1): 0.845 / - without it, 0.905 / - at 0.2, 0.97 / 0.94 at 1.0, 0.975 / 0.975 at 2.0."""


def chosen_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[N, T-1] mask of the next-token targets chosen_lm_loss counts: each list's best response."""
    return batch["response_mask"][batch["slots"][:, 0], 1:]


def chosen_lm_loss(classifier, hidden: torch.Tensor, batch: dict[str, torch.Tensor],
                   num_tokens: float) -> torch.Tensor:
    """Next-token NLL of each list's best response given its prompt, with the input embeddings as output head
    (tied, as in the causal LM the backbone came from), summed over this micro-batch and divided by the step's
    number of such tokens. Logits are formed at those positions only: never over prompts, rejected responses or
    padding (with a 150k vocabulary they would dwarf the model's activations)."""
    best = batch["slots"][:, 0]
    counted = chosen_targets(batch) != 0
    logits = torch.nn.functional.linear(hidden[best][:, :-1][counted], classifier.get_input_embeddings().weight)
    targets = batch["input_ids"][best][:, 1:][counted]
    return -token_logprobs(logits[None], targets[None]).sum() / num_tokens


class RewardModelTrainer(Trainer):
    stage = "train_rm"

    def setup(self) -> None:
        cfg, algo = self.cfg, self.cfg.algo
        self.score = algo.score or "last_token"
        self.tokenizer = load_tokenizer(cfg.model)
        self.train = load_preferences(cfg, "train", self.tokenizer, algo.on_invalid, self._info)
        self.eval_set = load_preferences(cfg, "eval", self.tokenizer, algo.on_invalid, self._info)
        self.eval_set = self.eval_set[:cfg.eval.num_examples or None]
        self.lengths = [example.length for example in self.train]
        self.sampler = StepSampler(len(self.train), cfg.run.seed)
        self.use_margin = algo.use_margin and any(e.margin for e in self.train)
        if algo.loss == "listwise" and (algo.label_smoothing or self.use_margin):
            raise ConfigError("algo.loss=listwise takes no algo.label_smoothing and no margin column; set "
                              "algo.label_smoothing=0 and algo.use_margin=false, or use algo.loss=pairwise")
        model = load_reward_model(training_model_config(cfg.model), self.tokenizer, cfg.run.seed)
        model = self.adapt(model, head=next((n for n in ("score", "classifier") if hasattr(model, n)), None))
        prepare_for_training(model, cfg.model)
        check_score(self.score, model)
        self.lm_coef = self.language_modelling_weight(model)
        # Chosen and rejected responses of unequal length: each micro-batch runs as a few passes of rows of similar
        # length, not one padded to its longest (not under ZeRO-3, where every pass is a collective).
        self.max_buckets = 4 if cfg.trainer.group_by_length and configured_zero_stage(cfg) < 3 else 1
        self.packed = has_token_head(model) and self.packs(model)
        self.shared_prompt = self.shares_prefixes() and has_token_head(model) and not self.packed
        self.engine = build_engine(model, cfg, self.world)
        self.engines = {"reward_model": self.engine}

    def language_modelling_weight(self, model) -> float:
        """algo.lm_coef, or for null the default where the regulariser can run (said, with why not otherwise)."""
        coef = self.cfg.algo.lm_coef
        why_not = None
        if not has_token_head(model):
            why_not = f"{type(model).__name__} is not a decoder with a token head, so it cannot predict tokens"
        elif configured_zero_stage(self.cfg) == 3:
            why_not = "it reads the input embeddings outside the forward pass, which ZeRO-3 partitions"
        if coef is None:
            if why_not:
                self._info(f"algo.lm_coef: the language-modelling regulariser is off: {why_not}")
            return 0.0 if why_not else DEFAULT_LM_COEF
        if coef and why_not:
            raise ConfigError(f"algo.lm_coef={coef}: {why_not}; set algo.lm_coef=0 (or null)")
        return float(coef)

    def batch_line(self) -> str:
        pairs = sum(len(e.response_ids) == 2 for e in self.train)
        kind = "pairs" if pairs == len(self.train) else "ranked lists"
        return f"{super().batch_line()} ({kind}; {len(self.train)} train, {len(self.eval_set)} held out)"

    def train_step(self) -> dict[str, Any]:
        t = self.cfg.trainer
        indices = self.sampler.rank_indices(self.samples_seen, self.global_batch, dist.rank(), self.world)
        batches = [collate_preferences([self.train[i] for i in mb], self.tokenizer.pad_token_id, self.shared_prompt,
                                       self.packed)
                   for mb in self.micro_batches(indices, self.lengths)]
        # The step's loss is the mean over its lists; DeepSpeed divides by grad_accum and averages over ranks,
        # so scaling by both keeps the gradient that of the whole step however it is split.
        scale = t.grad_accum * self.world
        lm_coef = self.lm_coef
        lm_tokens = 1.0
        if lm_coef:
            lm_tokens = max(dist.all_reduce_sum({"n": sum(float(chosen_targets(b).sum()) for b in batches)})["n"], 1.0)
        sums: dict[str, float] = {"loss": 0.0, "lm_loss": 0.0}
        grad_norm = None
        for batch in batches:
            batch = self.to_device(batch, self.engine.device)
            module = self.engine.module
            lm_loss = torch.zeros(())
            if has_token_head(module):
                hidden = packed_hidden_states(module, batch) if self.packed else hidden_states(
                    module, batch["input_ids"], batch["attention_mask"], self.max_buckets,
                    int(batch.get("prompt_width", 0)))
                flat = read_scores(head_rewards(module, hidden), batch, self.score)
                if lm_coef:
                    lm_loss = chosen_lm_loss(module, hidden, batch, lm_tokens)
            else:
                flat = sequence_scores(module, batch, self.score)
            scores = list_scores(flat, batch)
            loss = list_losses(self.cfg.algo, scores, batch, self.use_margin).sum() / self.global_batch
            backward(self.engine, (loss + lm_coef * lm_loss) * scale)
            grad_norm = optimizer_step(self.engine)
            sums["loss"] += loss.item()
            sums["lm_loss"] += lm_loss.item()
            for key, value in preference_sums(scores.detach().float(), batch["list_mask"]).items():
                sums[key] = sums.get(key, 0.0) + value
        self.samples_seen += self.global_batch
        total = dist.all_reduce_sum(sums)
        shown = ("pairwise_accuracy", "margin", "chosen_mean", "rejected_mean")
        metrics = {k: v for k, v in preference_metrics(total, "train/").items() if k.split("/")[1] in shown}
        lm = {"lm_loss": total["lm_loss"]} if lm_coef else {}
        return {"loss": total["loss"], **lm, "grad_norm": grad_norm, **metrics}

    def evaluate(self, final: bool = False) -> dict[str, float]:
        if not self.eval_set:
            return {}
        metrics, _ = evaluate_preferences(self.engine.module, self.eval_set, self.tokenizer.pad_token_id, self.score,
                                          self.cfg.eval.batch_size, self.cfg.algo, self.use_margin)
        return {f"eval/{k}": v for k, v in metrics.items()}

    def reward_statistics(self) -> dict[str, float]:
        """Mean and std of the scores of every response in the training set (or algo.stats_rows of them)."""
        rows = self.train
        limit = self.cfg.algo.stats_rows
        if limit is not None and limit < len(rows):
            rows = [rows[i] for i in sorted(random.Random(f"rm-stats/{self.cfg.run.seed}").sample(range(len(rows)),
                                                                                                limit))]
        mine, real = rank_share(rows)
        scores = score_preferences(self.engine.module, mine, self.tokenizer.pad_token_id, self.score,
                                   self.cfg.eval.batch_size, self.engine.device)[:real]
        flat = [s for lst in scores for s in lst]
        total = dist.all_reduce_sum({"n": len(flat), "sum": sum(flat), "sq": sum(s * s for s in flat)})
        mean = total["sum"] / total["n"]
        return {"mean": mean, "std": math.sqrt(max(total["sq"] / total["n"] - mean ** 2, 0.0)),
                "num_scores": int(total["n"])}

    def export(self, final_dir: Path) -> None:
        """final/: an AutoModelForSequenceClassification (num_labels=1) + tokenizer + reward_model.json."""
        data = self.cfg.data
        info = RewardModelInfo(score=self.score, prompt_template=data.prompt_template,
                               chat_template=data.chat_template, max_length=data.max_length,
                               **self.reward_statistics())
        self._info(f"reward statistics over {info.num_scores} training responses: mean {info.mean:.4g}, "
                   f"std {info.std:.4g} (saved in final/{INFO_FILE} for reward.normalize)")
        ckpt.save_pretrained(self.engine.module, self.tokenizer, final_dir,
                             state_dict=ckpt.full_state_dict(self.engine), extra_files={INFO_FILE: info.to_json()})
