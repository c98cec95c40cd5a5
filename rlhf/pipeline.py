"""`rlhf pipeline`: SFT -> reward model -> PPO -> GRPO, an equal-time SFT control, and a report.

Each stage is the ordinary stage command, run with wiring overrides (its run.dir under the pipeline
directory, the checkpoint it starts from, the reward model it scores with) followed by the user's own
overrides for it (`common.*`, then `<stage>.*`). A stage whose directory holds summary.json and final/ is
finished and skipped on a re-run; an unfinished one resumes from its last checkpoint, so a crashed
pipeline continues where it stopped. A stage that reads a stage run in this invocation runs again too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from omegaconf import DictConfig, OmegaConf

from rlhf.errors import ConfigError

ORDER = ("sft", "train_rm", "ppo", "grpo", "sft_control")
POLICY_ROWS = ("sft", "ppo", "grpo", "sft_control")
# The command each pipeline stage runs.
COMMAND = {"sft": "sft", "train_rm": "train_rm", "ppo": "ppo", "grpo": "grpo", "sft_control": "sft"}


SECTIONS = ORDER + ("common", "report")


def section_overrides(overrides: list[str]) -> list[str]:
    """`grpo.trainer.max_steps=50` sets a key inside a free-form stage section, which Hydra only allows as
    `++key=value` (add or replace): write it so for the user."""
    out = []
    for item in overrides:
        head = item.split("=", 1)[0].split(".", 1)[0]
        out.append(f"++{item}" if head in SECTIONS and "." in item.split("=", 1)[0] else item)
    return out


def flatten(section: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested or dotted keys -> {dotted.key: value} (lists and scalars are leaves)."""
    out: dict[str, Any] = {}
    for key, value in section.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{full}."))
        else:
            out[full] = value
    return out


def _render(value: Any) -> str:
    """A value in Hydra's override grammar."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_render(v) for v in value) + "]"
    text = str(value)
    if isinstance(value, str) and any(c in text for c in " ,[]{}()=:'\"\\"):
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return text


def as_overrides(section: Mapping[str, Any]) -> list[str]:
    return [f"{key}={_render(value)}" for key, value in flatten(section).items()]


@dataclass
class Plan:
    """What the pipeline will do: per stage its directory, the overrides it runs with, and its inputs."""

    root: Path
    stages: list[str]

    def dir(self, stage: str) -> Path:
        return self.root / stage

    def final(self, stage: str) -> Path:
        return self.dir(stage) / "final"

    def finished(self, stage: str) -> bool:
        return (self.dir(stage) / "summary.json").is_file() and self.final(stage).is_dir()

    def summary(self, stage: str) -> dict[str, Any]:
        path = self.dir(stage) / "summary.json"
        return json.loads(path.read_text()) if path.is_file() else {}


def inputs(stage: str, cfg: DictConfig) -> list[str]:
    """The stages whose final/ (or summary) this stage reads."""
    if stage == "train_rm":
        return ["sft"] if cfg.pipeline.rm_init == "sft" else []
    return {"sft": [], "ppo": ["sft", "train_rm"], "grpo": ["sft"] + (["train_rm"] if _grpo_uses_rm(cfg) else []),
            "sft_control": ["sft", "grpo"]}[stage]


def _grpo_uses_rm(cfg: DictConfig) -> bool:
    funcs = flatten(OmegaConf.to_container(cfg.grpo)).get("reward.funcs") or []
    return "model" in funcs or flatten(OmegaConf.to_container(cfg.grpo)).get("reward") == "model"


def wiring(stage: str, plan: Plan, cfg: DictConfig) -> list[str]:
    """Overrides that connect a stage to the pipeline: where it writes, what it starts from, what scores it."""
    out = [f"run.dir={plan.dir(stage)}", f"run.seed={cfg.run.seed}"]
    sft = _render(str(plan.final("sft")))
    if stage == "train_rm" and cfg.pipeline.rm_init == "sft":
        out.append(f"model.name_or_path={sft}")
    if stage in ("ppo", "grpo", "sft_control"):
        out.append(f"model.name_or_path={sft}")
    if stage == "ppo":
        out += ["reward=model", f"reward.model_path={_render(str(plan.final('train_rm')))}"]
    if stage == "grpo" and _grpo_uses_rm(cfg):
        out.append(f"reward.model_path={_render(str(plan.final('train_rm')))}")
    if stage == "sft_control":
        # More SFT from the same checkpoint on the same demonstrations, for as long as GRPO ran (all of its
        # wall time: setup and evaluations included, so the control is never the one short of time).
        grpo_s = plan.summary("grpo").get("wall_s")
        if grpo_s is None:
            raise ConfigError("pipeline stage sft_control runs for GRPO's wall time: run the grpo stage first "
                              f"({plan.dir('grpo')} has no summary.json)")
        out += [f"trainer.max_time_s={grpo_s}", "trainer.max_steps=1000000", "trainer.lr_scheduler=constant",
                "trainer.warmup_steps=0"]
    return out


def applies(command: str, key: str) -> bool:
    """Whether the stage command has config key `key` (a `common.*` override goes to the stages that have it)."""
    from rlhf.config import STAGE_SCHEMAS

    node: Any = OmegaConf.structured(STAGE_SCHEMAS[command])
    for part in key.split("."):
        if not isinstance(node, DictConfig):
            return False
        if part not in node:
            return len(node) == 0  # a free-form mapping (data.columns) takes any key
        node = node[part]
    return True


def stage_overrides(stage: str, plan: Plan, cfg: DictConfig) -> list[str]:
    common = {k: v for k, v in flatten(OmegaConf.to_container(cfg.common)).items() if applies(COMMAND[stage], k)}
    return wiring(stage, plan, cfg) + as_overrides(common) + as_overrides(OmegaConf.to_container(cfg[stage]))


def check_stages(cfg: DictConfig) -> list[str]:
    stages = list(cfg.pipeline.stages)
    unknown = [s for s in stages if s not in ORDER]
    if unknown:
        raise ConfigError(f"pipeline.stages: unknown stage(s) {unknown}; choose from {list(ORDER)}")
    bad_force = [s for s in cfg.pipeline.force if s not in ORDER and s != "all"]
    if bad_force:
        raise ConfigError(f"pipeline.force: unknown stage(s) {bad_force}; choose from {list(ORDER)} or all")
    if cfg.pipeline.rm_init not in ("sft", "config"):
        raise ConfigError(f"pipeline.rm_init must be sft or config, got {cfg.pipeline.rm_init!r}")
    return [s for s in ORDER if s in stages]


def run_pipeline(cfg: DictConfig, run_stage: Callable[[str, list[str]], Any],
                 echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the selected stages in order (skipping finished ones), then evaluate and report."""
    from rlhf.report import write_report

    stages = check_stages(cfg)
    plan = Plan(Path(cfg.run.dir or "outputs/pipeline"), stages)
    plan.root.mkdir(parents=True, exist_ok=True)
    (plan.root / "pipeline.yaml").write_text(OmegaConf.to_yaml(cfg))
    force = set(ORDER) if "all" in cfg.pipeline.force else set(cfg.pipeline.force)
    rerun: set[str] = set()
    for stage in stages:
        missing = [s for s in inputs(stage, cfg) if not plan.finished(s)]
        if missing:
            raise ConfigError(f"pipeline stage {stage} reads {', '.join(missing)}, which has not finished in "
                              f"{plan.root}: add it to pipeline.stages")
        stale = stage in force or any(s in rerun for s in inputs(stage, cfg))
        if plan.finished(stage) and not stale:
            echo(f"pipeline: {stage} already finished in {plan.dir(stage)}; skipped (pipeline.force=[{stage}] "
                 "runs it again)")
            continue
        overrides = stage_overrides(stage, plan, cfg)
        resumable = not stale and (plan.dir(stage) / "checkpoints").is_dir() and any(
            (plan.dir(stage) / "checkpoints").glob("step_*"))
        overrides.append("run.resume=true" if resumable else "run.overwrite=true")
        echo(f"pipeline: {stage}: rlhf {COMMAND[stage].replace('_', '-')} {' '.join(overrides)}")
        run_stage(COMMAND[stage], overrides)
        rerun.add(stage)
    if not cfg.pipeline.report:
        return {}
    return write_report(plan, cfg, run_stage, echo)
