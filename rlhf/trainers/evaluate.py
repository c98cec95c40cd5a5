"""`rlhf eval`: score a saved checkpoint without training it.

A reward model (a one-label sequence classifier, such as `rlhf train-rm`'s final/) is scored on preference
data: pairwise accuracy, mean margin, reward mean/std of chosen and rejected, ranking accuracy for K > 2.
A policy (a causal LM) answers held-out prompts greedily and is scored by the rule rewards.
Results go to `summary.json` in run.dir (default outputs/eval/<timestamp>) and to the console.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf, open_dict
from transformers import AutoConfig

from rlhf.data.loading import load_rows
from rlhf.engine import distributed as dist
from rlhf.errors import ConfigError, ModelError, RLHFError
from rlhf.models.zoo import is_sequence_classifier, load_reference, load_reward_model, load_tokenizer
from rlhf.rewards.combine import RewardSet
from rlhf.rewards.model import RewardModelInfo, check_score
from rlhf.rewards.preferences import evaluate_preferences, load_preferences
from rlhf.trainers.base import default_run_dir
from rlhf.trainers.held_out import HeldOut, evaluate_policy


class Evaluator:
    stage = "eval"

    def __init__(self, cfg):
        self.cfg = cfg

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        if not cfg.model.name_or_path:
            raise ConfigError("rlhf eval needs model.name_or_path=<a saved model directory or hub id>, e.g. "
                              "outputs/train_rm/<run>/final")
        start = time.time()
        dist.init_distributed(self.cfg.launcher.connect_timeout_s)
        try:
            self.run_dir = self._prepare_run_dir()
            if self._is_reward_model():
                summary = self._reward_model()
            else:
                summary = self._policy()
            summary = {"stage": "eval", "model": str(cfg.model.name_or_path), **summary,
                       "wall_s": round(time.time() - start, 2)}
            if dist.is_main():
                (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
                print(json.dumps(summary, indent=2), flush=True)
            return summary
        finally:
            dist.shutdown()

    def _prepare_run_dir(self) -> Path:
        run = self.cfg.run
        run_dir = Path(run.dir or dist.broadcast_object(default_run_dir("eval")))
        if dist.is_main():
            if (run_dir / "summary.json").exists() and not run.overwrite:
                raise RLHFError(f"{run_dir} already holds an evaluation (summary.json); replace it with "
                                "run.overwrite=true or choose another run.dir")
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg))
        dist.barrier()
        return run_dir

    def _is_reward_model(self) -> bool:
        source = str(self.cfg.model.name_or_path)
        try:
            config = AutoConfig.from_pretrained(source, trust_remote_code=self.cfg.model.trust_remote_code)
        except (OSError, ValueError) as error:
            raise ModelError(f"model {source} is neither a local model directory nor a reachable hub id "
                             f"({str(error).strip().splitlines()[0]})") from None
        return is_sequence_classifier(config)

    def _split(self) -> str:
        """A file or directory without an eval_split is scored whole; the built-in task on its test set."""
        data = self.cfg.data
        if data.path is not None and data.eval_split is None:
            with open_dict(data):
                data.eval_size = 0
            return "train"
        return "eval"

    def _reward_model(self) -> dict[str, Any]:
        cfg = self.cfg
        tokenizer = load_tokenizer(cfg.model)
        model = load_reward_model(cfg.model, tokenizer, cfg.run.seed).to(dist.device()).eval()
        info = RewardModelInfo.read(cfg.model.name_or_path)
        score = cfg.algo.score or (info.score if info else "last_token")
        check_score(score, model)
        if info is not None and (info.prompt_template, info.chat_template) != (cfg.data.prompt_template,
                                                                               cfg.data.chat_template):
            print(f"note: this reward model was trained with data.prompt_template={info.prompt_template!r} and "
                  f"data.chat_template={info.chat_template}; scoring with {cfg.data.prompt_template!r} and "
                  f"{cfg.data.chat_template}", flush=True)
        split = self._split()
        examples = load_preferences(cfg, split, tokenizer, cfg.algo.on_invalid, print)
        examples = examples[:cfg.eval.num_examples or None]
        if not examples:
            raise RLHFError(f"no held-out preference rows to score in split {split!r}")
        use_margin = cfg.algo.use_margin and cfg.algo.loss == "pairwise" and any(e.margin for e in examples)
        metrics, scores = evaluate_preferences(model, examples, tokenizer.pad_token_id, score, cfg.eval.batch_size,
                                               cfg.algo, use_margin)
        if dist.world_size() == 1:
            with (self.run_dir / "scores.jsonl").open("w") as f:
                for row in scores:
                    f.write(json.dumps({"scores": row}) + "\n")
        return {"kind": "reward_model", "score": score, "split": split, "rows": len(examples), **metrics}

    def _policy(self) -> dict[str, Any]:
        cfg = self.cfg
        tokenizer = load_tokenizer(cfg.model)
        model = load_reference(cfg.model, tokenizer, cfg.run.seed).to(dist.device())
        reference = None
        if cfg.reference:
            ref_cfg = OmegaConf.merge(cfg.model, {"name_or_path": cfg.reference, "tokenizer": None})
            reference = load_reference(ref_cfg, tokenizer, cfg.run.seed).to(dist.device())
        rows = load_rows(cfg.data, "prompt", self._split(), cfg.run.seed)
        held_out = HeldOut.build(rows, tokenizer, cfg.data, cfg.eval.num_examples)
        if len(held_out) == 0:
            raise RLHFError("no held-out prompts to answer")
        rewards = RewardSet.from_config(cfg.reward, dtype=cfg.model.dtype, batch_size=cfg.trainer.micro_batch_size,
                                        device=dist.device())
        metrics = evaluate_policy(model, tokenizer, held_out, cfg.eval, samples_file=self.run_dir / "eval_samples.jsonl",
                                  reference=reference, rewards=rewards)
        return {"kind": "policy", "rows": len(held_out), **{k.removeprefix("eval/"): v for k, v in metrics.items()}}
