"""`rlhf sft`: supervised fine-tuning on demonstrations, loss on completion tokens only."""

from __future__ import annotations

from typing import Any

import torch

from rlhf.algos.sft import sft_loss
from rlhf.data.loading import load_rows
from rlhf.data.sampler import StepSampler
from rlhf.data.tokenize import collate_lm, collate_lm_packed, encode_rows
from rlhf.engine import distributed as dist
from rlhf.engine.engine import backward, build_engine, optimizer_step, zero_stage
from rlhf.errors import DataError
from rlhf.models.packing import batch_forward
from rlhf.models.zoo import load_policy, load_tokenizer, training_model_config
from rlhf.trainers.base import Trainer
from rlhf.trainers.held_out import HeldOut, evaluate_policy


class SFTTrainer(Trainer):
    stage = "sft"

    def setup(self) -> None:
        cfg = self.cfg
        self.tokenizer = load_tokenizer(cfg.model)
        source = cfg.data.path or f"built-in task {cfg.data.task!r}"
        train_rows = load_rows(cfg.data, "sft", "train", cfg.run.seed)
        self.train, _, dropped = encode_rows(train_rows, self.tokenizer, cfg.data, "completion", source)
        if not self.train:
            raise DataError(f"{source}: no training rows left after dropping {dropped} prompts longer than "
                            f"data.max_prompt_length={cfg.data.max_prompt_length}")
        if dropped:
            self._info(f"dropped {dropped} of {len(train_rows)} training rows whose prompt is longer than "
                       f"data.max_prompt_length={cfg.data.max_prompt_length}")
        eval_rows = load_rows(cfg.data, "sft", "eval", cfg.run.seed)
        eval_rows = list(eval_rows) if eval_rows is not None else []
        self.eval_set, kept, _ = encode_rows(eval_rows, self.tokenizer, cfg.data, "completion", source)
        self.held_out = HeldOut.build([eval_rows[i] for i in kept], self.tokenizer, cfg.data,
                                      cfg.eval.num_examples)
        self.lengths = [len(e.prompt_ids) + len(e.response_ids) for e in self.train]
        self.sampler = StepSampler(len(self.train), cfg.run.seed)
        model = self.adapt(load_policy(training_model_config(cfg.model), self.tokenizer, cfg.run.seed))
        self.packed = self.packs(model)
        self.engine = build_engine(model, cfg, self.world)
        self.engines = {"policy": self.engine}

    def train_step(self) -> dict[str, Any]:
        t = self.cfg.trainer
        indices = self.sampler.rank_indices(self.samples_seen, self.global_batch, dist.rank(), self.world)
        batches = [self.collate([self.train[i] for i in mb]) for mb in self.micro_batches(indices, self.lengths)]
        num_tokens = dist.all_reduce_sum({"n": sum(float(b["loss_mask"].sum()) for b in batches)})["n"]
        # DeepSpeed divides by grad_accum and averages gradients over ranks; undo both so the step's
        # gradient is that of the token mean over every micro-batch on every rank.
        scale = t.grad_accum * self.world
        total, grad_norm = 0.0, None
        for batch in batches:
            batch = self.to_device(batch, self.engine.device)
            logits = batch_forward(self.engine, batch).logits
            loss = sft_loss(logits, batch["input_ids"], batch["loss_mask"], max(num_tokens, 1.0))
            backward(self.engine, loss * scale)
            grad_norm = optimizer_step(self.engine)
            total += loss.item()
        self.samples_seen += self.global_batch
        return {"loss": dist.all_reduce_sum({"loss": total})["loss"],
                "grad_norm": grad_norm, "tokens": num_tokens}

    def collate(self, rows: list) -> dict[str, torch.Tensor]:
        if self.packed:
            return collate_lm_packed(rows, self.cfg.algo.loss_on_prompt)
        return collate_lm(rows, self.tokenizer.pad_token_id, self.cfg.algo.loss_on_prompt)

    @torch.no_grad()
    def evaluate(self, final: bool = False) -> dict[str, float]:
        metrics: dict[str, float] = {}
        module = self.engine.module
        if self.eval_set:
            was_training = module.training
            module.eval()
            nll, count = 0.0, 0.0
            size = self.cfg.eval.batch_size
            mine = self.eval_set[dist.rank()::self.world]
            for start in range(0, len(mine), size):
                batch = self.to_device(collate_lm(mine[start:start + size], self.tokenizer.pad_token_id),
                                       self.engine.device)
                logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                n = float(batch["loss_mask"].sum())
                nll += sft_loss(logits, batch["input_ids"], batch["loss_mask"], 1.0).item()
                count += n
            module.train(was_training)
            total = dist.all_reduce_sum({"nll": nll, "n": count})
            metrics["eval/loss"] = total["nll"] / max(total["n"], 1.0)
        samples = self.run_dir / "eval_samples.jsonl" if final else None
        metrics.update(evaluate_policy(module, self.tokenizer, self.held_out, self.cfg.eval,
                                       synced_gpus=zero_stage(self.engine) == 3, samples_file=samples))
        return metrics

