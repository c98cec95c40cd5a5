"""The pipeline's pure parts: overrides from config sections, stage inputs, the targets check."""

import pytest
from omegaconf import OmegaConf

from rlhf.config import load_config
from rlhf.errors import ConfigError
from rlhf.plan import (POLICIES, STAGES, Plan, applies, as_overrides, check_stages, eval_data_overrides, flatten,
                       inputs, section, section_overrides, stage_overrides)
from rlhf.report import check_targets, table


def test_flatten_takes_nested_and_dotted_keys():
    assert flatten({"trainer": {"lr": 1e-4, "betas": [0.9, 0.99]}, "algo.beta": 0, "reward": "model"}) == {
        "trainer.lr": 1e-4, "trainer.betas": [0.9, 0.99], "algo.beta": 0, "reward": "model"}


def test_overrides_render_in_hydra_grammar():
    assert as_overrides({"a": None, "b": True, "c": [1, "x"], "d": "plain/path", "e": "has space, comma"}) == [
        "a=null", "b=true", "c=[1,x]", "d=plain/path", "e='has space, comma'"]


def test_section_keys_become_add_or_replace_overrides():
    assert section_overrides(["grpo.trainer.max_steps=5", "run.dir=x", "pipeline.stages=[sft]", "common.seed=1",
                              "sft={}"]) == ["++grpo.trainer.max_steps=5", "run.dir=x", "pipeline.stages=[sft]",
                                             "++common.seed=1", "sft={}"]


def test_pipeline_config_keeps_stage_sections():
    cfg = load_config("pipeline", section_overrides(["grpo.trainer.max_steps=5", "ppo.algo.kl_coef=0.1"]))
    assert flatten(OmegaConf.to_container(cfg.grpo))["trainer.max_steps"] == 5
    assert flatten(OmegaConf.to_container(cfg.ppo))["algo.kl_coef"] == 0.1
    assert section("grpo", cfg)["trainer.eval_every"] == 25  # the recipe's value kept beside the user's


def test_stage_inputs_follow_the_recipe():
    cfg = load_config("pipeline", [])
    assert inputs("ppo", cfg) == ["sft", "train_rm"]
    assert inputs("grpo", cfg) == ["sft"]
    assert inputs("sft_control", cfg) == ["sft", "grpo"]
    assert inputs("train_rm", cfg) == ["sft"]  # the demo's reward model starts from the SFT checkpoint
    assert inputs("train_rm", load_config("pipeline", ["pipeline.rm_init=config"])) == []
    with_rm = load_config("pipeline", section_overrides(["grpo.reward.funcs=[accuracy,model]"]))
    assert inputs("grpo", with_rm) == ["sft", "train_rm"]


def test_unknown_stages_are_refused():
    with pytest.raises(ConfigError, match=r"pipeline.stages\[1\]='dpoo': expected one of sft, train_rm"):
        load_config("pipeline", ["pipeline.stages=[sft,dpoo]"])
    with pytest.raises(ConfigError, match="pipeline.force"):
        load_config("pipeline", ["pipeline.force=[everything]"])
    assert check_stages(load_config("pipeline", ["pipeline.stages=[grpo,sft]"])) == ["sft", "grpo"]


def test_targets_compare_with_sft_and_the_control():
    stages = {"sft": {"accuracy": 0.5}, "train_rm": {"pairwise_accuracy": 0.96}, "ppo": {"accuracy": 0.64},
              "grpo": {"accuracy": 0.8}, "sft_control": {"accuracy": 0.55}}
    met = {t["target"]: (t["measured"], t["met"]) for t in check_targets(stages, 590.0)}
    assert met["reward model held-out pairwise accuracy"] == (0.96, True)
    assert met["PPO accuracy gain over SFT"][1] is False
    assert met["GRPO accuracy gain over SFT"] == (pytest.approx(0.3), True)
    assert met["GRPO accuracy above the equal-time SFT control"] == (pytest.approx(0.25), True)
    assert met["pipeline wall time (s)"] == (590.0, True)
    rows = table(stages)
    assert rows[0][:2] == ["checkpoint", "held-out accuracy"] and len(rows) == 5


def test_common_overrides_reach_the_stages_that_have_the_key():
    assert applies("grpo", "rollout.max_new_tokens") and not applies("sft", "rollout.max_new_tokens")
    assert applies("sft", "trainer.lr") and applies("train_rm", "model.tiny.hidden_size")
    assert not applies("sft", "trainer.prompts_per_step") and applies("ppo", "trainer.prompts_per_step")
    assert applies("sft", "data.columns.prompt")  # free-form mapping
    assert applies("ppo", "deepspeed")  # a group choice


def test_stages_are_listed_once_in_pipeline_order():
    assert [s.name for s in STAGES] == ["sft", "train_rm", "ppo", "grpo", "sft_control", "dpo"]
    assert [s.name for s in POLICIES] == ["sft", "ppo", "grpo", "sft_control", "dpo"]
    assert {s.name: s.command for s in STAGES}["sft_control"] == "sft"
    assert [r[0] for r in table({s.name: {} for s in STAGES})[1:]] == [s.label for s in POLICIES]


def test_the_cli_still_finds_section_overrides_in_the_pipeline_module():
    from rlhf.pipeline import run_pipeline, section_overrides as from_pipeline

    assert from_pipeline is section_overrides and callable(run_pipeline)


def test_the_report_evaluates_on_the_pipelines_own_data():
    assert eval_data_overrides(load_config("pipeline", [])) == ["data=arithmetic"]  # the built-in task
    cfg = load_config("pipeline", section_overrides(["common.data=gsm8k", "common.trainer.lr=0.1",
                                                     "grpo.data.max_prompt_length=99", "sft.data.path=demos"]))
    assert eval_data_overrides(cfg) == ["data=arithmetic", "data=gsm8k", "data.max_prompt_length=99"]
    evaluated = load_config("eval", eval_data_overrides(cfg))
    assert evaluated.data.path == "openai/gsm8k" and evaluated.data.max_prompt_length == 99


def test_every_stage_config_is_checked_before_the_first_stage_runs(tmp_path):
    from rlhf.plan import ORDER, Plan, check_stage_configs

    cfg = load_config("pipeline", section_overrides([f"run.dir={tmp_path}", "grpo.algo.loss_type=dapoo"]))
    plan = Plan(tmp_path, list(ORDER))
    with pytest.raises(ConfigError, match=r"pipeline stage grpo: algo.loss_type='dapoo': expected one of"):
        check_stage_configs(list(ORDER), plan, cfg)
    # the control's wiring reads GRPO's wall time, which does not exist yet: a stand-in when checking ahead
    good = load_config("pipeline", section_overrides([f"run.dir={tmp_path}"]))
    check_stage_configs(list(ORDER), plan, good)


def test_dpo_is_an_optional_policy_stage_from_the_sft_checkpoint(tmp_path):
    from rlhf.plan import ORDER, Plan, check_stage_configs, stage_overrides

    assert "dpo" not in load_config("pipeline", []).pipeline.stages  # the demo's five stages by default
    cfg = load_config("pipeline", section_overrides([f"run.dir={tmp_path}", "pipeline.stages=[sft,dpo]",
                                                     "dpo.algo.beta=0.2"]))
    assert check_stages(cfg) == ["sft", "dpo"] and inputs("dpo", cfg) == ["sft"] and "dpo" in [p.name for p in POLICIES]
    overrides = stage_overrides("dpo", Plan(tmp_path, ["sft", "dpo"]), cfg)
    assert f"model.name_or_path={tmp_path / 'sft' / 'final'}" in overrides and "algo.beta=0.2" in overrides
    check_stage_configs(["sft", "dpo"], Plan(tmp_path, list(ORDER)), cfg)


def test_the_recipe_sets_each_stage_under_common_and_the_stage_section(tmp_path):
    demo = load_config("pipeline", [])
    assert section("grpo", demo)["trainer.max_steps"] == 110  # conf/recipe/demo.yaml
    assert demo.pipeline.rm_init == "sft"
    full = load_config("pipeline", section_overrides(["recipe=full", "ppo.trainer.lr=3e-4"]))
    assert section("grpo", full)["trainer.max_steps"] == 140
    assert full.pipeline.rm_init == "config" and inputs("train_rm", full) == []
    assert section("ppo", full) == {"trainer.lr": 3e-4}
    with pytest.raises(ConfigError, match="recipe"):
        load_config("pipeline", ["recipe=fastest"])
    # the recipe's GRPO micro-batch (64) comes first, a user's common one after it, the stage's own section last
    cfg = load_config("pipeline", section_overrides(["common.trainer.micro_batch_size=4", "grpo.trainer.lr=1e-5"]))
    grpo = stage_overrides("grpo", Plan(tmp_path, ["grpo"]), cfg)
    assert grpo.index("trainer.micro_batch_size=64") < grpo.index("trainer.micro_batch_size=4")
    assert grpo.index("trainer.lr=0.0002") < grpo.index("trainer.lr=1e-05")
