"""A model or tokenizer that is not there is named by the key that pointed at it, with what was looked for."""

import re

import pytest

from rlhf.config import ModelConfig
from rlhf.errors import ModelError
from rlhf.models import build_char_tokenizer, load_policy, load_reference, load_reward_model, load_tokenizer


def _raises(load, message):
    with pytest.raises(ModelError) as error:
        load()
    assert re.match(message, str(error.value)), str(error.value)
    return str(error.value)


@pytest.mark.parametrize("load", [
    lambda cfg: load_tokenizer(cfg),  # the first thing every stage loads: the tokenizer beside the model
    lambda cfg: load_policy(cfg, build_char_tokenizer(), seed=0),
    lambda cfg: load_reference(cfg, build_char_tokenizer(), seed=0),
    lambda cfg: load_reward_model(cfg, build_char_tokenizer(), seed=0),
], ids=["tokenizer", "policy", "reference", "reward_model"])
def test_a_missing_model_directory_is_the_models_not_the_tokenizers(tmp_path, load):
    missing = tmp_path / "no" / "such_model"
    message = _raises(lambda: load(ModelConfig(name_or_path=str(missing))),
                      rf"model\.name_or_path={re.escape(str(missing))}: no such directory, and not a Hugging Face "
                      r"hub id")
    assert "tokenizer" not in message


def test_a_relative_path_says_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _raises(lambda: load_tokenizer(ModelConfig(name_or_path="./checkpoints/final")),
            rf"model\.name_or_path=\./checkpoints/final: no such directory "
            rf"\({re.escape(str(tmp_path / 'checkpoints' / 'final'))}\)")


def test_a_missing_tokenizer_is_named_as_model_tokenizer(tmp_path):
    missing = tmp_path / "no_tokenizer"
    build_char_tokenizer().save_pretrained(tmp_path / "model")
    for model in (None, str(tmp_path / "model")):
        _raises(lambda: load_tokenizer(ModelConfig(name_or_path=model, tokenizer=str(missing))),
                rf"model\.tokenizer={re.escape(str(missing))}: no such directory")


def test_a_file_where_a_directory_belongs(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    _raises(lambda: load_tokenizer(ModelConfig(name_or_path=str(tmp_path / "model.safetensors"))),
            r"model\.name_or_path=.*model\.safetensors: a file, not a directory")


def test_a_hub_id_not_in_the_cache_of_an_offline_run(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _raises(lambda: load_tokenizer(ModelConfig(name_or_path="no-such-org/no-such-model")),
            r"model\.name_or_path=no-such-org/no-such-model: no such local directory, and not a hub id in the "
            r"Hugging Face cache, the only place an offline run \(HF_HUB_OFFLINE=1\) loads from")


def test_a_bare_reward_model_path_is_not_blamed_on_the_model_group(tmp_path):
    missing = tmp_path / "critic"
    message = _raises(lambda: load_reward_model(str(missing), build_char_tokenizer(), seed=0),
                      rf"reward model {re.escape(str(missing))}: no such directory")
    assert "model.name_or_path" not in message
