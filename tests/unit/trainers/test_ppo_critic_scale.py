"""A critic copied from the reward model is rescaled to the rewards PPO actually gives it to predict."""

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from rlhf.config import ModelConfig, PPOConfig, TinyModelConfig
from rlhf.models.critic import build_critic
from rlhf.models.tokenizer import build_char_tokenizer
from rlhf.trainers.ppo import PPOTrainer


def test_critic_head_takes_the_reward_weight_and_normalisation():
    tok = build_char_tokenizer()
    cfg = ModelConfig(tiny=TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64))
    critic = build_critic("policy", cfg, None, tok, 0)
    torch.nn.init.normal_(critic.value_head.weight)
    before = critic.value_head.weight.detach().clone()
    trainer = PPOTrainer(OmegaConf.structured(PPOConfig))
    trainer.rewards = SimpleNamespace(model=SimpleNamespace(mean=2.0, std=4.0), model_weight=0.5)
    trainer._scale_critic_head(critic)
    torch.testing.assert_close(critic.value_head.weight, before * 0.5 / 4.0)


def test_variance_from_all_reduced_sums_is_the_population_variance():
    from rlhf.trainers.step_stats import variance

    x = torch.tensor([0.5, -1.0, 2.0, 3.5, 0.0], dtype=torch.float64)
    assert variance(float(x.sum()), float((x ** 2).sum()), len(x)) == pytest.approx(float(x.var(unbiased=False)))
    # no spread at all: 0, never a negative rounding error
    assert variance(0.0, 0.0, 5) == 0.0
