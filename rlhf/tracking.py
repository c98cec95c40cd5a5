"""Metric sinks: metrics.jsonl, a progress bar with live metrics, and (optionally) wandb. Rank 0 only."""

from __future__ import annotations

import json
import math
import secrets
import sys
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_id.txt"

# Metrics shown on the progress bar when present, in this order.
HEADLINE = ("loss", "reward/mean", "eval/accuracy", "eval/pairwise_accuracy", "kl", "lr")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricLogger:
    def __init__(self, run_dir: Path, cfg: DictConfig, full_config: DictConfig, total_steps: int,
                 start_step: int, enabled: bool):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._wandb = None
        self._bar = None
        if not enabled:
            return
        path = self.run_dir / METRICS_FILE
        # A run killed after its last checkpoint logged steps that the resumed run will redo: drop them.
        kept = [r for r in read_metrics(self.run_dir) if r.get("step", 0) <= start_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = path.open("a")
        if cfg.progress:
            self._bar = tqdm(total=total_steps, initial=start_step, desc=full_config.stage, dynamic_ncols=True,
                             mininterval=0.5 if sys.stderr.isatty() else 30.0, file=sys.stderr)
        if cfg.wandb:
            self._wandb = self._init_wandb(cfg, full_config)

    def _init_wandb(self, cfg: DictConfig, full_config: DictConfig):
        import wandb

        id_file = self.run_dir / WANDB_ID_FILE
        # Our own id, kept in the run directory, so a resumed run continues the same wandb run.
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id)
        return wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or self.run_dir.name,
                          tags=list(cfg.tags), dir=str(self.run_dir), id=run_id, resume="allow",
                          config=OmegaConf.to_container(full_config, resolve=True))

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
        if self._bar is not None:
            shown = {k: record[k] for k in HEADLINE if isinstance(record.get(k), (int, float))}
            self._bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
