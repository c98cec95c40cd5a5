"""algo.lm_coef: the chosen response's next-token loss that regularises a reward model's backbone."""

import math
from types import SimpleNamespace
from unittest.mock import patch

import pytest
import torch
from omegaconf import OmegaConf

from rlhf.config import ModelConfig, TinyModelConfig
from rlhf.errors import ConfigError
from rlhf.models import build_char_tokenizer, load_reward_model
from rlhf.rewards.model import Preference, collate_preferences, hidden_states
from rlhf.trainers.reward import DEFAULT_LM_COEF, RewardModelTrainer, chosen_lm_loss
from tests.tiny_models import save_tiny_bert_classifier


@pytest.fixture
def model_and_batch():
    torch.manual_seed(0)
    tokenizer = build_char_tokenizer()
    cfg = ModelConfig(tiny=TinyModelConfig(hidden_size=16, num_layers=1, intermediate_size=32, num_heads=2))
    model = load_reward_model(cfg, tokenizer, seed=0)
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = [tokenizer.eos_token_id]
    prefs = [Preference(enc("1+2="), [enc("3") + eos, enc("<answer>4") + eos]),
             Preference(enc("12+30="), [enc("<answer>42</answer>") + eos, enc("4") + eos, enc("43") + eos])]
    return model, collate_preferences(prefs, tokenizer.pad_token_id), prefs


def reference(model, prefs):
    """Plain loop: -log softmax(h_t E^T)[x_{t+1}] over every token of each list's best response, averaged."""
    emb = model.get_input_embeddings().weight
    total, count = 0.0, 0
    for p in prefs:
        ids = torch.tensor([p.prompt_ids + p.response_ids[0]])
        hidden = hidden_states(model, ids, torch.ones_like(ids))[0]
        for t in range(len(p.prompt_ids) - 1, ids.shape[1] - 1):
            total -= torch.log_softmax(hidden[t] @ emb.T, -1)[ids[0, t + 1]].item()
            count += 1
    return total / count, count


def test_matches_a_plain_loop_and_splits_by_the_step_token_count(model_and_batch):
    model, batch, prefs = model_and_batch
    expected, count = reference(model, prefs)
    assert count == 2 + 5  # "3" and "<answer>42</answer>" (a token per character, a tag one token), each closed by EOS
    hidden = hidden_states(model, batch["input_ids"], batch["attention_mask"])
    whole = chosen_lm_loss(model, hidden, batch, float(count))
    assert whole.item() == pytest.approx(expected, rel=1e-5)
    # Two micro-batches of one list each, divided by the step's count, add up to the whole step's mean.
    parts = 0.0
    for p in prefs:
        one = collate_preferences([p], 0)
        parts += chosen_lm_loss(model, hidden_states(model, one["input_ids"], one["attention_mask"]), one,
                                float(count)).item()
    assert parts == pytest.approx(expected, rel=1e-5)
    assert math.isfinite(expected) and expected > 0


def test_gradient_reaches_the_embeddings_and_the_backbone_not_the_score_head(model_and_batch):
    model, batch, _ = model_and_batch
    hidden = hidden_states(model, batch["input_ids"], batch["attention_mask"])
    chosen_lm_loss(model, hidden, batch, 10.0).backward()
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0
    assert model.base_model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    assert model.score.weight.grad is None


def weight(model, lm_coef, stage=0):
    """RewardModelTrainer.language_modelling_weight on a stand-in trainer with this config."""
    said = []
    cfg = OmegaConf.create({"algo": {"lm_coef": lm_coef}, "deepspeed": {"zero_stage": stage}})
    trainer = SimpleNamespace(cfg=cfg, _info=said.append)
    with patch("rlhf.trainers.reward.configured_zero_stage", lambda c: c.deepspeed.zero_stage):
        return RewardModelTrainer.language_modelling_weight(trainer, model), said


def test_null_turns_it_on_where_it_can_run_and_says_why_not_elsewhere(model_and_batch, tmp_path):
    model, _, _ = model_and_batch
    assert weight(model, None) == (DEFAULT_LM_COEF, [])
    assert weight(model, 0.3) == (0.3, []) and weight(model, 0) == (0.0, [])
    coef, said = weight(model, None, stage=3)
    assert coef == 0.0 and "ZeRO-3" in said[0]
    with pytest.raises(ConfigError, match=r"algo.lm_coef=0.5: .*ZeRO-3.*set algo.lm_coef=0"):
        weight(model, 0.5, stage=3)
    save_tiny_bert_classifier(tmp_path / "bert")
    bert = load_reward_model(ModelConfig(name_or_path=str(tmp_path / "bert")), None, seed=0)
    coef, said = weight(bert, None)
    assert coef == 0.0 and "BertForSequenceClassification is not a decoder" in said[0]
    with pytest.raises(ConfigError, match="cannot predict tokens"):
        weight(bert, 1.0)
