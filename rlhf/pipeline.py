"""`rlhf pipeline`: SFT -> reward model -> PPO -> GRPO, an equal-time SFT control, and a report.

Each stage is the ordinary stage command, run with wiring overrides (its run.dir under the pipeline
directory, the checkpoint it starts from, the reward model it scores with) followed by the user's own
overrides for it (`common.*`, then `<stage>.*`). A stage whose directory holds summary.json and final/ is
finished and skipped on a re-run; an unfinished one resumes from its last checkpoint, so a crashed
pipeline continues where it stopped. A stage that reads a stage run in this invocation runs again too.
What each stage reads and runs with is computed in `rlhf.plan`; the report is `rlhf.report`'s.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from rlhf.errors import ConfigError
from rlhf.jobs import Job, Runner
from rlhf.plan import (ORDER, STAGE, Plan, check_stage_configs, check_stages, inputs, section_overrides,
                       stage_overrides)
from rlhf.report import evaluation_jobs, write_report

__all__ = ["run_pipeline", "section_overrides"]  # the cli composes the pipeline's config with section_overrides


def run_pipeline(cfg: DictConfig, run_stage: Callable[[str, list[str]], Any],
                 echo: Callable[[str], None] = print, workers: int = 1) -> dict[str, Any]:
    """Run the selected stages (skipping finished ones), `workers` at a time where they do not read each other's
    output (rlhf.jobs), then evaluate and report."""
    began = time.time()
    stages = check_stages(cfg)
    plan = Plan(Path(cfg.run.dir or "outputs/pipeline"), stages)
    plan.root.mkdir(parents=True, exist_ok=True)
    (plan.root / "pipeline.yaml").write_text(OmegaConf.to_yaml(cfg))
    force = set(ORDER) if "all" in cfg.pipeline.force else set(cfg.pipeline.force)
    rerun: set[str] = set()
    jobs = []
    for stage in stages:
        missing = [s for s in inputs(stage, cfg) if not plan.finished(s) and s not in rerun]
        if missing:
            raise ConfigError(f"pipeline stage {stage} reads {', '.join(missing)}, which has not finished in "
                              f"{plan.root}: add it to pipeline.stages")
        stale = stage in force or any(s in rerun for s in inputs(stage, cfg))
        if plan.finished(stage) and not stale:
            echo(f"pipeline: {stage} already finished in {plan.dir(stage)}; skipped (pipeline.force=[{stage}] "
                 "runs it again)")
            continue
        resumable = not stale and any((plan.dir(stage) / "checkpoints").glob("step_*"))
        jobs.append(Job(stage, STAGE[stage].command, partial(_overrides, stage, plan, cfg, resumable), plan.dir(stage),
                        after=tuple(inputs(stage, cfg))))
        rerun.add(stage)
    check_stage_configs([job.name for job in jobs], plan, cfg)
    # Each policy's evaluation joins the graph after the stage that trains it, so it fills a free worker while
    # other stages still train; the report is written once every job has finished.
    evaluations = evaluation_jobs(plan, cfg, scheduled=[job.name for job in jobs]) if cfg.pipeline.report else []
    Runner(run_stage, echo, workers).run(jobs + evaluations)
    if not cfg.pipeline.report:
        return {}
    return write_report(plan, cfg, echo, began=began, ran={j.name: j.wall_s for j in jobs}, evaluations=evaluations)


def _overrides(stage: str, plan: Plan, cfg: DictConfig, resumable: bool) -> list[str]:
    """A stage's overrides, computed when it starts (the control reads GRPO's wall time from its summary)."""
    return stage_overrides(stage, plan, cfg) + ["run.resume=true" if resumable else "run.overwrite=true"]
