import dataclasses
import typing
from pathlib import Path

import pytest

from rlhf import docs
from rlhf.config import STAGE_SCHEMAS, field_docs, group_options, load_config
from rlhf.errors import ConfigError

REPO = Path(__file__).resolve().parents[3]


def test_defaults_compose():
    cfg = load_config("sft", [])
    assert cfg.stage == "sft"
    assert cfg.model.name_or_path is None
    assert cfg.deepspeed.config.zero_optimization.stage == 0


def test_overrides_apply_and_groups_switch():
    cfg = load_config("sft", ["trainer.lr=1e-4", "deepspeed=zero2", "data.arithmetic.digits=3"])
    assert cfg.trainer.lr == 1e-4
    assert cfg.deepspeed.config.zero_optimization.stage == 2
    assert cfg.data.arithmetic.digits == 3


@pytest.mark.parametrize(
    "override, expected",
    [
        ("trainer.lrr=1", "unknown config key 'trainer.lrr'. Did you mean trainer.lr?"),
        ("data.arithmetic.digit=3", "Did you mean data.arithmetic.digits?"),
        ("foo=1", "unknown config key 'foo'"),
        ("trainer.lr=abc", "trainer.lr: expected float, got 'abc'"),
        ("trainer.max_steps=1.5", "trainer.max_steps: expected integer"),
        ("model=foo", "unknown option 'foo' for config group 'model'"),
        ("deepspeed=zero9", "Did you mean deepspeed=zero3?"),
        ("trainer.lr", "overrides are key=value"),
        ("model=hf", "model=hf needs model.name_or_path"),
        ("+trainer.lrr=1", "unknown config key 'trainer.lrr'. Did you mean trainer.lr?"),
        ("+model.tiny.hidden=8", "unknown config key 'model.tiny.hidden'. Did you mean model.tiny.hidden_size"),
    ],
)
def test_config_errors_are_one_clear_line(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config("sft", [override])
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_free_form_mappings_take_new_keys():
    cfg = load_config("sft", ["+data.columns.prompt=question", "+deepspeed.overrides.wall_clock_breakdown=true"])
    assert cfg.data.columns.prompt == "question" and cfg.deepspeed.overrides.wall_clock_breakdown


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match="Valid keys under 'trainer': max_steps, max_time_s, lr"):
        load_config("sft", ["trainer.lrr=1"])


def test_group_options_listed():
    groups = group_options()
    assert "tiny" in groups["model"] and "zero3_offload" in groups["deepspeed"]


def test_every_field_documented():
    """Every key a user can set has a docstring (the root's group fields are sections, not keys)."""

    def walk(cls, root=False):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name])
            elif not root or f.name == "stage":
                assert f.name in field_docs(cls), f"{cls.__name__}.{f.name} has no docstring"

    for schema in STAGE_SCHEMAS.values():
        walk(schema, root=True)


def test_configuration_reference_is_current():
    current = (REPO / "docs" / "configuration.md").read_text()
    assert current == docs.render(), "docs/configuration.md is stale: run `make docs`"
