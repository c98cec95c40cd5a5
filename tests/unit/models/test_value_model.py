import pytest
import torch
from transformers import AutoModelForSequenceClassification

from rlhf.config import ModelConfig, TinyModelConfig
from rlhf.errors import ModelError
from rlhf.models import (
    ValueModel,
    build_char_tokenizer,
    build_critic,
    load_critic,
    load_policy,
    load_reward_model,
)

ARCH = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=64)
TEXTS = ["12+34=46", "7+8=", "hello world"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def model_cfg():
    return ModelConfig(tiny=ARCH)


@pytest.fixture(scope="module")
def reward_dir(tokenizer, model_cfg, tmp_path_factory):
    """A saved reward model whose score head is no longer its fresh initialisation."""
    directory = tmp_path_factory.mktemp("reward_model")
    reward_model = load_reward_model(model_cfg, tokenizer, seed=1)
    with torch.no_grad():
        reward_model.score.weight.copy_(torch.linspace(-1, 1, ARCH.hidden_size))
    reward_model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _batch(tokenizer):
    return tokenizer(TEXTS, padding=True, return_tensors="pt")


def test_policy_init_shares_backbone_and_starts_at_zero(tokenizer, model_cfg):
    critic = build_critic("policy", model_cfg, None, tokenizer, seed=0)
    batch = _batch(tokenizer)
    values = critic(batch["input_ids"], batch["attention_mask"])
    assert values.shape == batch["input_ids"].shape and values.dtype == torch.float32
    assert torch.count_nonzero(values) == 0
    policy_backbone = load_policy(model_cfg, tokenizer, seed=0).base_model.state_dict()
    critic_backbone = critic.backbone.state_dict()
    assert all(torch.equal(critic_backbone[k], v) for k, v in policy_backbone.items())


def test_values_are_per_token_and_trainable(tokenizer, model_cfg):
    critic = build_critic("policy", model_cfg, None, tokenizer, seed=0)
    torch.nn.init.normal_(critic.value_head.weight)
    batch = _batch(tokenizer)
    values = critic(batch["input_ids"], batch["attention_mask"])
    assert values[0, 0] != values[0, 1]
    (values * batch["attention_mask"]).sum().backward()
    assert critic.value_head.weight.grad is not None
    assert critic.backbone.get_input_embeddings().weight.grad is not None


def test_reward_model_init_copies_score_head(tokenizer, model_cfg, reward_dir):
    critic = build_critic("reward_model", model_cfg, str(reward_dir), tokenizer, seed=0)
    reward_model = load_reward_model(str(reward_dir), tokenizer, seed=0).eval()
    assert torch.equal(critic.value_head.weight, reward_model.score.weight)
    assert torch.equal(critic.value_head.weight[0], torch.linspace(-1, 1, ARCH.hidden_size))
    critic.eval()
    batch = tokenizer(["12+34=46"], return_tensors="pt")
    with torch.no_grad():
        values = critic(batch["input_ids"], batch["attention_mask"])
        torch.testing.assert_close(values[:, -1], reward_model(**batch).logits[:, 0], atol=1e-5, rtol=0)


def test_save_load_round_trip(tokenizer, model_cfg, reward_dir, tmp_path):
    critic = build_critic("reward_model", model_cfg, str(reward_dir), tokenizer, seed=0).eval()
    critic.save_pretrained(tmp_path)
    reloaded = load_critic(str(tmp_path)).eval()
    batch = _batch(tokenizer)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch), critic(**batch))
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert plain.config.num_labels == 1 and plain.config.pad_token_id == tokenizer.pad_token_id


def test_bf16_critic_returns_float32(tokenizer, reward_dir):
    bf16 = ModelConfig(tiny=ARCH, dtype="bf16")
    batch = _batch(tokenizer)
    for critic in (
        build_critic("policy", bf16, None, tokenizer, seed=0),
        build_critic("reward_model", bf16, reward_dir, tokenizer, seed=0),
    ):
        assert critic.backbone.dtype == torch.bfloat16
        assert critic(batch["input_ids"], batch["attention_mask"]).dtype == torch.float32


def test_gradient_checkpointing_follows_model_config(tokenizer):
    critic = build_critic("policy", ModelConfig(tiny=ARCH, gradient_checkpointing=True), None, tokenizer, seed=0)
    assert critic.classifier.is_activation_checkpointing and critic.config.use_cache is False


def test_bad_init_is_a_model_error(tokenizer, model_cfg):
    with pytest.raises(ModelError, match="init='value'"):
        build_critic("value", model_cfg, None, tokenizer, seed=0)
    with pytest.raises(ModelError, match="needs a reward model path"):
        build_critic("reward_model", model_cfg, None, tokenizer, seed=0)


def test_classifier_without_linear_score_head_is_rejected():
    class NoScore(torch.nn.Module):
        pass

    with pytest.raises(ModelError, match="cannot serve as a critic"):
        ValueModel(NoScore())
