"""What `rlhf pipeline` runs: its stages, where each writes, what each reads, and the overrides each runs with.

Pure functions of the pipeline config and the stage directories; `rlhf.pipeline` runs the plan and
`rlhf.report` reads it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from rlhf.config import STAGE_SCHEMAS, load_config
from rlhf.errors import ConfigError


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline."""

    name: str  # its section in conf/pipeline.yaml and its directory under the pipeline's run.dir
    command: str  # the stage command it runs (`rlhf <command>`)
    label: str  # how the report names it
    is_policy: bool  # its final/ is a policy the report evaluates (the reward model's is not)
    curves: tuple[str, ...]  # the metrics that tell its story, in the report's plots/<name>.png
    reads: tuple[str, ...] = ()  # the stages whose final/ (or summary.json) it always reads; see `inputs`


_SFT_CURVES = ("loss", "eval/loss", "eval/accuracy", "eval/format_rate", "eval/response_length")
_RL_CURVES = ("reward/mean", "eval/accuracy", "kl/k3", "kl/k1", "entropy", "response/length_mean")
STAGES = (
    Stage("sft", "sft", "SFT (cold start)", is_policy=True, curves=_SFT_CURVES),
    Stage("train_rm", "train_rm", "reward model", is_policy=False,
          curves=("loss", "eval/loss", "eval/pairwise_accuracy", "eval/margin", "train/pairwise_accuracy")),
    Stage("ppo", "ppo", "PPO (reward model)", is_policy=True,
          curves=_RL_CURVES + ("value/explained_variance", "eval/reward", "eval/auc/model"),
          reads=("sft", "train_rm")),
    Stage("grpo", "grpo", "GRPO (verifier)", is_policy=True,
          curves=_RL_CURVES + ("reward/zero_variance_frac", "eval/reward"), reads=("sft",)),
    Stage("sft_control", "sft", "SFT control (GRPO's wall time)", is_policy=True, curves=_SFT_CURVES,
          reads=("sft", "grpo")),
    Stage("dpo", "dpo", "DPO (preference pairs)", is_policy=True,
          curves=("loss", "rewards/margin", "eval/rewards/accuracy", "eval/accuracy"), reads=("sft",)),
)
STAGE = {s.name: s for s in STAGES}
ORDER = tuple(s.name for s in STAGES)
POLICIES = tuple(s for s in STAGES if s.is_policy)
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


def render_value(value: Any) -> str:
    """A value in Hydra's override grammar."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(render_value(v) for v in value) + "]"
    text = str(value)
    if isinstance(value, str) and any(c in text for c in " ,[]{}()=:'\"\\"):
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return text


def as_overrides(section: Mapping[str, Any]) -> list[str]:
    return [f"{key}={render_value(value)}" for key, value in flatten(section).items()]


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
    out = list(STAGE[stage].reads)
    if stage == "train_rm" and cfg.pipeline.rm_init == "sft":
        out.append("sft")
    if stage == "grpo" and _grpo_uses_rm(cfg):
        out.append("train_rm")
    return out


def recipe_section(stage: str, cfg: DictConfig) -> dict[str, Any]:
    """The recipe's settings of a stage (conf/recipe/), flattened."""
    return flatten(OmegaConf.to_container(cfg.recipe_stages).get(stage) or {})


def section(stage: str, cfg: DictConfig) -> dict[str, Any]:
    """A stage's settings from the recipe and its own section (which wins), flattened."""
    return {**recipe_section(stage, cfg), **flatten(OmegaConf.to_container(cfg[stage]))}


def _grpo_uses_rm(cfg: DictConfig) -> bool:
    grpo = section("grpo", cfg)
    return "model" in (grpo.get("reward.funcs") or []) or grpo.get("reward") == "model"


def wiring(stage: str, plan: Plan, cfg: DictConfig, ahead: bool = False) -> list[str]:
    """Overrides that connect a stage to the pipeline: where it writes, what it starts from, what scores it.
    `ahead`: for checking the config before the stages it reads have run (GRPO's wall time is then a stand-in)."""
    out = [f"run.dir={plan.dir(stage)}", f"run.seed={cfg.run.seed}"]
    sft = render_value(str(plan.final("sft")))
    if stage == "train_rm" and cfg.pipeline.rm_init == "sft":
        out.append(f"model.name_or_path={sft}")
    if stage in ("ppo", "grpo", "sft_control", "dpo"):
        out.append(f"model.name_or_path={sft}")
    if stage == "ppo":
        out += ["reward=model", f"reward.model_path={render_value(str(plan.final('train_rm')))}"]
    if stage == "grpo" and _grpo_uses_rm(cfg):
        out.append(f"reward.model_path={render_value(str(plan.final('train_rm')))}")
    if stage == "sft_control":
        # More SFT from the same checkpoint on the same demonstrations, for as long as GRPO ran (all of its
        # wall time: setup and evaluations included, so the control is never the one short of time).
        grpo_s = plan.summary("grpo").get("wall_s", 1.0 if ahead else None)
        if grpo_s is None:
            raise ConfigError("pipeline stage sft_control runs for GRPO's wall time: run the grpo stage first "
                              f"({plan.dir('grpo')} has no summary.json)")
        out += [f"trainer.max_time_s={grpo_s}", "trainer.max_steps=1000000", "trainer.lr_scheduler=constant",
                "trainer.warmup_steps=0"]
    return out


def applies(command: str, key: str) -> bool:
    """Whether the stage command has config key `key` (a `common.*` override goes to the stages that have it)."""
    node: Any = OmegaConf.structured(STAGE_SCHEMAS[command])
    for part in key.split("."):
        if not isinstance(node, DictConfig):
            return False
        if part not in node:
            return len(node) == 0  # a free-form mapping (data.columns) takes any key
        node = node[part]
    return True


def stage_overrides(stage: str, plan: Plan, cfg: DictConfig, ahead: bool = False) -> list[str]:
    """The wiring, then the recipe's settings of the stage, then `common.*`, then the stage's own section: each
    later one wins, so a user's `common.trainer.micro_batch_size=4` reaches every stage whatever the recipe says."""
    command = STAGE[stage].command
    common = {k: v for k, v in flatten(OmegaConf.to_container(cfg.common)).items() if applies(command, k)}
    return (wiring(stage, plan, cfg, ahead) + as_overrides(recipe_section(stage, cfg)) + as_overrides(common)
            + as_overrides(OmegaConf.to_container(cfg[stage])))


def check_stage_configs(stages: list[str], plan: Plan, cfg: DictConfig) -> None:
    """Compose every stage's config before the first one runs, so that a bad key or value in any stage's section
    answers now, naming the stage, instead of after the stages before it have trained."""
    for stage in stages:
        try:
            load_config(STAGE[stage].command, stage_overrides(stage, plan, cfg, ahead=True))
        except ConfigError as error:
            raise ConfigError(f"pipeline stage {stage}: {error}") from None


def eval_data_overrides(cfg: DictConfig) -> list[str]:
    """The data the report evaluates every policy on: the built-in task, then the pipeline's own data settings
    (`common.data*`, then GRPO's `grpo.data*`: the prompts its verifier scores, as the evaluation's rule reward
    does). `report.data*` comes after these and wins."""
    out = ["data=arithmetic"]
    for settings in (flatten(OmegaConf.to_container(cfg.common)), section("grpo", cfg)):
        out += [o for o in as_overrides(settings) if o.split("=", 1)[0] == "data" or o.startswith("data.")]
    return out


def check_stages(cfg: DictConfig) -> list[str]:
    """The selected stages in pipeline order (their names, like pipeline.force's, are choices checked when the
    config is composed)."""
    stages = list(cfg.pipeline.stages)
    return [s for s in ORDER if s in stages]
