"""Weights the user did not set follow reward.funcs; explicit weights of the wrong length fail at compose time."""

from pathlib import Path

import pytest

from rlhf.config import load_config
from rlhf.errors import ConfigError
from rlhf.plan import Plan, section_overrides, stage_overrides

MINE = "tests.integration.rewards_for_tests:varied"


def test_funcs_alone_weigh_each_function_one():
    assert list(load_config("grpo", [f"reward.funcs=[{MINE}]"]).reward.weights) == [1.0]
    assert list(load_config("ppo", [f"reward.funcs=[accuracy,{MINE}]"]).reward.weights) == [1.0, 1.0]


def test_group_and_explicit_weights_are_kept():
    assert list(load_config("grpo", []).reward.weights) == [1.0, 0.2]
    cfg = load_config("grpo", [f"reward.funcs=[accuracy,{MINE}]", "reward.weights=[1.0,0.5]"])
    assert list(cfg.reward.weights) == [1.0, 0.5]


@pytest.mark.parametrize("overrides, message", [
    (["reward.weights=[1.0]"], "reward.weights=[1.0] gives 1 weight(s) for the 2 functions of "
                               "reward.funcs=[accuracy, format]: set reward.weights with 2 values, one per function"),
    ([f"reward.funcs=[accuracy,format,{MINE}]", "reward.weights=[1.0,0.2]"],
     f"for the 3 functions of reward.funcs=[accuracy, format, {MINE}]: set reward.weights with 3 values"),
])
def test_explicit_weights_of_the_wrong_length_are_refused(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config("grpo", overrides)
    assert message in str(info.value)


def test_funcs_in_a_pipeline_stage_section(tmp_path: Path):
    pipeline = load_config("pipeline", section_overrides([f"grpo.reward.funcs=[accuracy,format,{MINE}]"]))
    cfg = load_config("grpo", stage_overrides("grpo", Plan(tmp_path, ["grpo"]), pipeline))
    assert list(cfg.reward.funcs) == ["accuracy", "format", MINE] and list(cfg.reward.weights) == [1.0, 1.0, 1.0]
