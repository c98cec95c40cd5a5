"""The skeleton every stage shares: run directory, engines, loop, evaluation, checkpoints, final export.

A stage subclasses `Trainer` and fills in `setup` (models, data, engines), `train_step` (one optimizer
step, returning its metrics) and `evaluate`; everything else happens here, the same way for every stage.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from omegaconf import DictConfig, OmegaConf

from rlhf.engine import checkpoint as ckpt
from rlhf.engine import distributed as dist
from rlhf.engine.engine import configured_zero_stage, frozen_model, guard_of
from rlhf.errors import ConfigError, RLHFError
from rlhf.models.lora import AdapterOff, adapter_of, add_adapters
from rlhf.models.packing import enable_packing, supports_packing
from rlhf.tracking import MetricLogger
from rlhf.plotting import plot_run

# What a run writes into run.dir; only checkpoints and final/ are work worth refusing to replace.
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints", "final")


def default_run_dir(stage: str) -> str:
    return str(Path("outputs") / stage / datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))


class Trainer:
    stage = "base"

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.step = 0
        self.samples_seen = 0
        self.engines: dict[str, Any] = {}
        self.tokenizer = None
        self._stop_signal: int | None = None

    # ---- what a stage provides -------------------------------------------------------------------
    def setup(self) -> None:
        raise NotImplementedError

    def train_step(self) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self, final: bool = False) -> dict[str, float]:
        return {}

    def batch_line(self) -> str:
        t = self.cfg.trainer
        return (f"batch: micro {t.micro_batch_size} x accum {t.grad_accum} x world {self.world} = "
                f"global {self.global_batch} rows/step")

    def export(self, final_dir: Path) -> None:
        """Write the trained model in Hugging Face format (default: the `policy` engine's module); with LoRA the
        adapters folded in, and the adapter itself in final/adapter/."""
        engine = self.engines["policy"]
        ckpt.save_pretrained(engine.module, self.tokenizer, final_dir, state_dict=ckpt.full_state_dict(engine),
                             adapter=adapter_of(engine))

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def summary(self, final_eval: dict[str, float]) -> dict[str, Any]:
        """Headline results: the final held-out metrics without their `eval/` prefix (`eval/loss` -> `eval_loss`)."""
        return {k.replace("eval/loss", "eval_loss").removeprefix("eval/"): v for k, v in final_eval.items()}

    # ---- derived sizes ---------------------------------------------------------------------------
    @property
    def world(self) -> int:
        return dist.world_size()

    @property
    def global_batch(self) -> int:
        t = self.cfg.trainer
        return t.micro_batch_size * t.grad_accum * self.world

    # ---- the run ---------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        start = time.time()
        dist.init_distributed(self.cfg.launcher.connect_timeout_s)
        try:
            self._prepare_run_dir()
            transformers.set_seed(self.cfg.run.seed)
            resume_from = ckpt.find_checkpoint(self.run_dir, self.cfg.run.resume)
            universal = resume_from is not None and ckpt.needs_universal(resume_from, self.world, self.zero_stage())
            if universal:  # DeepSpeed reads a universal checkpoint only into engines built to expect one
                self.cfg.deepspeed.overrides = {**self.cfg.deepspeed.overrides, "checkpoint": {"load_universal": True}}
                saved = ckpt.read_state(resume_from)
                self._info(f"{resume_from} was written by {saved.get('world_size')} process(es) under ZeRO-"
                           f"{saved.get('zero_stage', '?')}; converting it to DeepSpeed's universal format for "
                           f"{self.world} under ZeRO-{self.zero_stage()}")
            self.setup()
            if resume_from is not None:
                self._resume(resume_from, universal)
            self.logger = MetricLogger(self.run_dir, self.cfg.logger, self.cfg, self.cfg.trainer.max_steps,
                                       self.step, enabled=dist.is_main())
            self._info(f"{self.stage}: run dir {self.run_dir}")
            self._info(self.batch_line())
            if resume_from is not None:
                self._info(f"resumed from {resume_from} at step {self.step} ({self.samples_seen} samples seen)")
            summary = self._loop(start)
            return summary
        finally:
            if hasattr(self, "logger"):
                self.logger.close()
            dist.shutdown()

    def _loop(self, start: float) -> dict[str, Any]:
        t = self.cfg.trainer
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            if self.step == 0 and t.eval_every > 0:
                began = time.time()
                initial = self.evaluate()
                self.initial_eval = initial
                self.logger.log(0, {**initial, "time/step_s": time.time() - began})
            loop_start = time.time()
            while self.step < t.max_steps and not self._out_of_time(loop_start):
                began = time.time()
                self._seed_step()
                metrics = self.train_step()
                self.step += 1
                for engine in self.engines.values():
                    guard = guard_of(engine)
                    metrics.update(guard.end_step(self.step) if guard is not None else {})
                metrics["lr"] = next(iter(self.engines.values())).get_lr()[0] if self.engines else None
                metrics["time/step_s"] = time.time() - began
                metrics["samples_seen"] = self.samples_seen
                if t.eval_every > 0 and self.step % t.eval_every == 0 and self.step < t.max_steps:
                    metrics.update(self.evaluate())
                if self.step % max(t.log_every, 1) == 0 or "eval/loss" in metrics:
                    self.logger.log(self.step, {k: v for k, v in metrics.items() if v is not None})
                self.logger.advance()
                if t.save_every > 0 and self.step % t.save_every == 0 and self.step < t.max_steps:
                    self._save()
                if self._stop_signal is not None:
                    self._save()
                    raise RLHFError(f"stopped by signal {self._stop_signal} at step {self.step}; checkpoint saved. "
                                    f"Resume with: rlhf {self.stage.replace('_', '-')} run.dir={self.run_dir} run.resume=true")
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        began = time.time()
        final_eval = self.evaluate(final=True)
        self.logger.log(self.step, {**final_eval, "time/step_s": time.time() - began})
        self._save()
        self.export(self.run_dir / "final")
        summary = {"stage": self.stage, "steps": self.step, "wall_s": round(time.time() - start, 2),
                   **self.summary(final_eval)}
        if getattr(self, "initial_eval", None):
            summary["initial"] = self.summary(self.initial_eval)
        if dist.is_main():
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            plot_run(self.run_dir)
            self._info(f"{self.stage} done in {summary['wall_s']:.0f}s: " + ", ".join(
                f"{k}={v:.4g}" for k, v in summary.items() if isinstance(v, float) and k != "wall_s"))
        dist.barrier()  # no rank moves on (the pipeline's next stage reads final/) before rank 0 has written it
        return summary

    def _out_of_time(self, loop_start: float) -> bool:
        """Whether trainer.max_time_s has run out; rank 0's clock decides, so every rank stops at the same step."""
        limit = self.cfg.trainer.max_time_s
        if limit is None:
            return False
        return bool(dist.broadcast_object(time.time() - loop_start >= limit))

    def _seed_step(self) -> None:
        """Seed every step from (seed, rank, step): sampling and dropout then do not depend on whether the
        run was interrupted and resumed, nor on how many processes ran the steps before."""
        entropy = np.random.SeedSequence([self.cfg.run.seed, dist.rank(), self.step]).generate_state(1)[0]
        transformers.set_seed(int(entropy))

    def _on_signal(self, signum, frame) -> None:
        if self._stop_signal is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self._stop_signal = signum

    def _info(self, message: str) -> None:
        if dist.is_main():
            if hasattr(self, "logger"):
                self.logger.print(message)
            else:
                print(message, flush=True)

    # ---- run directory, checkpoints ----------------------------------------------------------------
    def _prepare_run_dir(self) -> None:
        run = self.cfg.run
        path = run.dir or dist.broadcast_object(default_run_dir(self.stage))
        self.run_dir = Path(path)
        resuming = run.resume not in (False, None, "false", "False", "")
        if dist.is_main():
            existing = [m for m in RUN_MARKERS if (self.run_dir / m).exists()]
            finished = ckpt.finished_checkpoints(self.run_dir / "checkpoints")
            holds_work = (self.run_dir / "final").exists() or bool(finished)
            if existing and not resuming:
                if holds_work and not run.overwrite:
                    raise RLHFError(
                        f"run directory {self.run_dir} already holds a run ({', '.join(existing)}); resume it with "
                        "run.resume=true, replace it with run.overwrite=true, or choose another run.dir")
                if not holds_work:  # a start that failed before its first checkpoint: nothing to keep
                    self._info(f"run directory {self.run_dir} holds only {', '.join(existing)} of a run that stopped "
                               "before its first checkpoint; replacing them")
                for m in existing:
                    target = self.run_dir / m
                    shutil.rmtree(target) if target.is_dir() else target.unlink()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg))
        dist.barrier()

    def _save(self) -> None:
        guards = {role: guard_of(e).total for role, e in self.engines.items() if guard_of(e) is not None}
        state = {"step": self.step, "samples_seen": self.samples_seen, "world_size": self.world,
                 "zero_stage": self.zero_stage(), "stage": self.stage, "guard_skipped_total": guards,
                 **self.extra_state()}
        ckpt.save_checkpoint(self.run_dir / "checkpoints", self.step, self.engines, state,
                             self.cfg.trainer.keep_last)

    def zero_stage(self) -> int:
        return configured_zero_stage(self.cfg)

    def shares_prefixes(self) -> bool:
        """Whether a prompt that several rows continue runs once for all of them (trainer.shared_prefix,
        rlhf.models.prefix): not under ZeRO-3, where ranks holding different prompts would run different numbers of
        forward passes, each a collective; nor with gradient checkpointing, under which transformers drops the cache
        from every layer it checkpoints (the backward's replay would write it a second time)."""
        return (bool(self.cfg.trainer.shared_prefix) and self.zero_stage() < 3
                and not self.cfg.model.gradient_checkpointing)

    def packs(self, model) -> bool:
        """Whether micro-batches run padding-free (trainer.padding_free, rlhf.models.packing): on a model whose
        attention is sdpa, switched here to the packed wrapper; another runs padded, said once."""
        if not self.cfg.trainer.padding_free:
            return False
        if enable_packing(model):
            return True
        self._info(f"trainer.padding_free: {type(model).__name__} runs on attention "
                   f"{getattr(model.config, '_attn_implementation', None)!r}, not sdpa: micro-batches run padded")
        return False

    def adapt(self, model, head: str | None = None):
        """`model` with LoRA adapters when model.lora.r > 0 (rlhf.models.lora; `head`: a reward model's new score
        head, trained whole), said with how many weights train; else `model` as it is."""
        lora = self.cfg.model.lora
        if not lora.r:
            return model
        if self.zero_stage() == 3:
            raise ConfigError(f"model.lora.r={lora.r} under ZeRO-3 is not supported: the adapters are folded into "
                              "partitioned weights at export. Use deepspeed=zero2 (the frozen base has no optimizer "
                              "state to partition), or model.lora.r=0")
        model = add_adapters(model, lora, head)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        self._info(f"LoRA r={lora.r}, alpha={lora.alpha:g}: {trainable:,} of {total:,} weights train"
                   + (f" ({head} whole)" if head else ""))
        return model

    def reference_for(self, engine, load):
        """The frozen reference policy: with LoRA the policy itself, adapters off (no second copy of the weights);
        else `load()`'s model, packed like the policy, as frozen_model makes it."""
        if adapter_of(engine) is not None:
            return AdapterOff(engine)
        model = load()
        if supports_packing(engine):
            enable_packing(model)
        return frozen_model(model, self.cfg, self.world, engine.device)

    def _resume(self, path: Path, universal: bool = False) -> None:
        state = ckpt.load_checkpoint(path, self.engines, universal)
        if state.get("stage") != self.stage:
            raise ConfigError(f"checkpoint {path} is from stage {state.get('stage')!r}, not {self.stage!r}")
        self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])
        for role, total in state.get("guard_skipped_total", {}).items():
            guard = guard_of(self.engines.get(role))
            if guard is not None:
                guard.total = int(total)
        self.load_extra_state(state)

    # ---- shared helpers for stages -------------------------------------------------------------------
    def micro_batches(self, indices: list[int], lengths: list[int]) -> list[list[int]]:
        """Cut this rank's rows of the step into grad_accum micro-batches, longest first when grouping by
        length (fewer pad tokens; the step's rows, and so the gradient, are the same either way)."""
        t = self.cfg.trainer
        order = sorted(indices, key=lambda i: -lengths[i]) if t.group_by_length else list(indices)
        return [order[i * t.micro_batch_size:(i + 1) * t.micro_batch_size] for i in range(t.grad_accum)]

    @staticmethod
    def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in batch.items()}
