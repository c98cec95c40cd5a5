"""Choice-valued keys are Enums that OmegaConf checks when the config is composed, and that still read as strings."""

import json
import subprocess
import sys
import typing
from enum import Enum

import pytest
from omegaconf import OmegaConf

from rlhf import config as schema
from rlhf.config import STAGE_SCHEMAS, Choice, load_config
from rlhf.errors import ConfigError

CHOICE_KEYS = [  # (stage, key): every choice-valued key of the schemas
    ("sft", "model.dtype"), ("sft", "data.task"), ("sft", "data.format"), ("sft", "data.on_long_prompt"),
    ("sft", "trainer.lr_scheduler"), ("train_rm", "algo.loss"), ("train_rm", "algo.score"),
    ("train_rm", "algo.on_invalid"), ("grpo", "reward.on_error"), ("grpo", "reward.api"), ("grpo", "algo.advantage"),
    ("grpo", "algo.scale_rewards"), ("grpo", "algo.loss_type"), ("grpo", "algo.ratio_level"),
    ("grpo", "algo.zero_variance"), ("grpo", "algo.kl_estimator"), ("ppo", "algo.kl_in"), ("ppo", "algo.kl_estimator"),
    ("ppo", "algo.loss_type"), ("ppo", "algo.truncation"), ("ppo", "critic.init"), ("pipeline", "pipeline.rm_init"),
    ("pipeline", "pipeline.stages"), ("pipeline", "pipeline.force"),
]


def _field_type(stage: str, key: str) -> type:
    kind: typing.Any = STAGE_SCHEMAS[stage]
    for part in key.split("."):
        kind = typing.get_type_hints(kind)[part]
    args = [a for a in typing.get_args(kind) if a is not type(None)]  # Optional[X] and List[X] -> X
    return args[0] if args else kind


def _choices() -> list[type[Choice]]:
    return [v for v in vars(schema).values() if isinstance(v, type) and issubclass(v, Choice) and v is not Choice]


@pytest.mark.parametrize("stage, key", CHOICE_KEYS)
def test_choice_keys_are_enums_refused_at_compose_with_the_valid_ones(stage, key):
    kind = _field_type(stage, key)
    assert issubclass(kind, Choice), f"{key} is a {kind}, not a Choice"
    value = "[nope]" if key.startswith("pipeline.") and key != "pipeline.rm_init" else "nope"
    with pytest.raises(ConfigError) as info:
        load_config(stage, [f"{key}={value}"])
    suffix = "[0]" if value.startswith("[") else ""
    assert str(info.value).startswith(f"{key}{suffix}='nope': expected one of {', '.join(m.value for m in kind)}")
    assert "\n" not in str(info.value)


def test_a_typo_names_the_closest_choice():
    with pytest.raises(ConfigError) as info:
        load_config("grpo", ["algo.loss_type=dapoo"])
    assert str(info.value) == ("algo.loss_type='dapoo': expected one of grpo, bnpo, dapo, dr_grpo. "
                               "Did you mean dapo?")


def test_members_are_named_by_their_values():
    assert len(_choices()) >= 20
    for kind in _choices():
        assert all(m.name == m.value for m in kind), kind


def test_a_choice_reads_as_its_string():
    cfg = load_config("grpo", ["algo.loss_type=bnpo", "reward.on_error=raise"])
    value = cfg.algo.loss_type
    assert isinstance(value, Enum) and value == "bnpo" and value != "dapo"
    assert str(value) == f"{value}" == "{}".format(value) == "bnpo"
    assert {"bnpo": 1}[value] == 1 and value in ("grpo", "bnpo") and value in {"bnpo"}
    assert json.dumps({"loss_type": value}) == '{"loss_type": "bnpo"}'
    assert "loss_type: bnpo" in OmegaConf.to_yaml(cfg) and "on_error: raise" in OmegaConf.to_yaml(cfg)
    assert cfg.reward.on_error == "raise"
    assert OmegaConf.create(OmegaConf.to_yaml(cfg)).algo.loss_type == "bnpo"  # a written config.yaml reads back


def test_defaults():
    grpo = load_config("grpo", [])
    assert grpo.algo.scale_rewards is None  # the estimator's own default
    assert "scale_rewards" not in (schema.conf_dir() / "grpo.yaml").read_text()
    assert load_config("ppo", []).algo.truncation == "terminal"
    assert load_config("grpo", ["algo.advantage=rloo", "algo.scale_rewards=batch"]).algo.scale_rewards == "batch"
    pipeline = load_config("pipeline", ["pipeline.stages=[sft,grpo]", "pipeline.force=[all]"])
    assert list(pipeline.pipeline.stages) == ["sft", "grpo"] and "all" in pipeline.pipeline.force


@pytest.mark.parametrize("stage, overrides, message", [
    ("ppo", ["algo.kl_in=loss", "algo.kl_estimator=k1"],
     "algo.kl_in=loss with algo.kl_estimator=k1: k1 as a loss term has a zero-mean gradient and regularises "
     "nothing: use k3 or k2"),
    ("grpo", ["algo.kl_estimator=k1", "algo.beta=0.04"],
     "algo.kl_estimator=k1 with algo.beta=0.04: k1 as a loss term has a zero-mean gradient"),
    ("grpo", ["algo.advantage=reinforce_pp", "algo.scale_rewards=group"],
     "it supports algo.scale_rewards=batch or none"),
    ("grpo", ["algo.group_size=1"], "algo.group_size=1 with algo.advantage=grpo"),
    ("ppo", ["algo.adaptive_kl=true", "algo.kl_coef=0"], "algo.adaptive_kl=true steers algo.kl_coef"),
    ("ppo", ["reward.dense=true", "algo.truncation=bootstrap"], "use algo.truncation=terminal with dense rewards"),
])
def test_cross_key_rules_refused_at_compose(stage, overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(stage, overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("stage, overrides", [
    ("ppo", ["algo.kl_in=loss", "algo.kl_estimator=k3"]),
    ("ppo", ["algo.kl_in=reward", "algo.kl_estimator=k1"]),  # k1 in the reward is InstructGPT's penalty
    ("grpo", ["algo.kl_estimator=k1", "algo.beta=0"]),
    ("grpo", ["algo.advantage=reinforce_pp", "algo.scale_rewards=none", "algo.group_size=1"]),
])
def test_allowed_combinations_compose(stage, overrides):
    load_config(stage, overrides)


@pytest.mark.parametrize("stage, override, expected", [
    ("grpo", "algo.oversample=0.5", "algo.oversample=0.5: expected >= 1"),
    ("grpo", "algo.epsilon_high=0", "algo.epsilon_high=0.0: expected > 0 or null"),
    ("grpo", "algo.beta=-0.1", "algo.beta=-0.1: expected >= 0"),
    ("grpo", "algo.entropy_coef=-1", "algo.entropy_coef=-1.0: expected >= 0"),
    ("ppo", "algo.ppo_epochs=0", "algo.ppo_epochs=0: expected >= 1"),
    ("ppo", "algo.mini_batches=0", "algo.mini_batches=0: expected >= 1"),
    ("ppo", "algo.samples_per_prompt=0", "algo.samples_per_prompt=0: expected >= 1"),
    ("ppo", "algo.kl_coef=-0.01", "algo.kl_coef=-0.01: expected >= 0"),
    ("ppo", "algo.dual_clip=1.0", "algo.dual_clip=1.0: expected > 1"),
    ("train_rm", "algo.label_smoothing=0.5", "algo.label_smoothing=0.5: expected in [0, 0.5)"),
])
def test_algorithm_ranges_checked_at_compose(stage, override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(stage, [override])
    assert str(info.value).startswith(expected)


def test_config_errors_import_no_heavy_library():
    """A config error must answer before torch, transformers, datasets or DeepSpeed load (seconds)."""
    code = ("import sys; from rlhf.config import load_config; from rlhf.errors import ConfigError\n"
            "load_config('grpo', []); load_config('pipeline', [])\n"
            "try: load_config('grpo', ['algo.loss_type=x'])\nexcept ConfigError: pass\n"
            "import rlhf.cli, rlhf.pipeline\n"
            "heavy = {'torch', 'transformers', 'datasets', 'deepspeed'} & {m.split('.')[0] for m in sys.modules}\n"
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_choices_match_the_registries_and_tables_that_consume_them():
    from rlhf.algos.advantages import ADVANTAGE_ESTIMATORS
    from rlhf.algos.aggregation import LOSS_AGGREGATIONS
    from rlhf.algos.kl import KL_ESTIMATORS
    from rlhf.algos.reward_model import RM_LOSSES
    from rlhf.data.formats import LAYOUT_COLUMNS
    from rlhf.data.loading import BUILTIN_TASKS
    from rlhf.engine.engine import lr_factor
    from rlhf.models.critic import CRITIC_INITS
    from rlhf.models.zoo import DTYPES
    from rlhf.plan import ORDER
    from rlhf.rewards.adapters import APIS
    from rlhf.rewards.model import SCORES

    def values(kind):
        return {m.value for m in kind}

    assert values(schema.Advantage) == set(ADVANTAGE_ESTIMATORS.names())
    assert values(schema.KLEstimator) == set(KL_ESTIMATORS.names())
    assert values(schema.RMLoss) == set(RM_LOSSES.names())
    assert values(schema.GRPOLossType) | values(schema.PPOLossType) <= set(LOSS_AGGREGATIONS.names())
    assert values(schema.DataFormat) == {"auto", *LAYOUT_COLUMNS}
    assert values(schema.Task) == set(BUILTIN_TASKS)
    assert values(schema.CriticInit) == {"auto", *CRITIC_INITS}
    assert [m.value for m in schema.PipelineStage] == list(ORDER)
    assert values(schema.ForcedStage) == {*ORDER, "all"}
    assert values(schema.RewardAPI) == set(APIS)
    assert values(schema.RMScore) == set(SCORES)
    assert values(schema.Dtype) == set(DTYPES)
    for kind in schema.LRScheduler:
        assert 0 < lr_factor(5, 0, 10, kind, 0.1) <= 1
