"""Every RL setting that is set reaches the gradient (entropy bonus, KL estimator, reward scale), and a policy with
dropout switched off computes in the update the log-probs its rollout computed (ratio exactly 1)."""

import pytest
import torch
from omegaconf import OmegaConf
from transformers import GPT2Config, GPT2LMHeadModel

from rlhf.algos.advantages import rloo_advantages
from rlhf.algos.policy import clipped_policy_loss
from rlhf.config import GRPOConfig, TinyModelConfig
from rlhf.data.sampler import StepSampler
from rlhf.models.dropout import disable_dropout
from rlhf.models.tiny import build_tiny_model
from rlhf.models.tokenizer import build_char_tokenizer
from rlhf.rollout.generation import SamplingParams
from rlhf.rollout.experience import batched_logprobs, build_experience, response_logprobs
from rlhf.trainers.grpo import GRPOTrainer
from rlhf.trainers.rl import Samples
from rlhf.trainers.step_stats import StepStats

TOK = build_char_tokenizer()
PROMPTS = [[10, 11, 12], [13, 14]]
RESPONSES = [[20, 21, 22], [23, 24], [25, 26, 27, 28], [29], [20, 22], [21, 23, 25], [24, 26], [27]]
REWARDS = [1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.0, 0.2]


class FakeEngine(torch.nn.Module):
    """The policy as a trainer holds it: called like the model, `.module` for the no-gradient passes."""

    def __init__(self, model):
        super().__init__()
        self.module, self.device = model, torch.device("cpu")

    def forward(self, **kwargs):
        return self.module(**kwargs)


def tiny(seed):
    return build_tiny_model(TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), TOK, seed)


def grpo_trainer(**algo) -> GRPOTrainer:
    cfg = OmegaConf.structured(GRPOConfig)
    cfg.algo.group_size, cfg.trainer.prompts_per_step, cfg.trainer.micro_batch_size = 4, 2, 8
    cfg.rollout.max_new_tokens = 6
    for key, value in algo.items():
        cfg.algo[key] = value
    trainer = GRPOTrainer(cfg)
    trainer._check_sizes()
    trainer.tokenizer, trainer.shared_prefix, trainer.sampler = TOK, False, StepSampler(100, seed=0)
    trainer.sampling = SamplingParams.from_config(cfg.rollout)
    return trainer


def grpo_step_gradient(**algo) -> torch.Tensor:
    """The policy gradient of one GRPO step on fixed samples (generation and the optimizer step left out)."""
    trainer = grpo_trainer(**algo)
    trainer.engine = FakeEngine(tiny(0))
    trainer.reference = tiny(1).eval() if trainer.cfg.algo.beta > 0 else None

    def fake_sample(indices, stats, positions):
        stats.samples, stats.reward, stats.length = 8, sum(REWARDS), 20.0
        return Samples([PROMPTS[i // 4] for i in range(8)], RESPONSES, list(REWARDS), [i // 4 for i in range(8)])

    trainer.sample = fake_sample
    trainer.policy_backward = lambda loss: loss.backward()
    metrics = trainer.train_step()
    assert metrics["loss"] == metrics["loss"]  # a number, not NaN
    return torch.cat([p.grad.flatten() for p in trainer.engine.parameters() if p.grad is not None])


def test_entropy_coef_changes_the_policy_gradient():
    without, with_bonus = grpo_step_gradient(entropy_coef=0.0), grpo_step_gradient(entropy_coef=0.1)
    assert not torch.allclose(without, with_bonus, atol=1e-7)


def test_the_kl_estimator_chosen_is_the_one_in_the_gradient():
    k3, k2 = grpo_step_gradient(beta=0.5, kl_estimator="k3"), grpo_step_gradient(beta=0.5, kl_estimator="k2")
    assert not torch.allclose(k3, k2, atol=1e-7)
    assert not torch.allclose(k3, grpo_step_gradient(beta=0.0), atol=1e-7)


def test_scale_rewards_applies_to_rloo_and_null_keeps_its_own_default():
    rewards = torch.tensor(REWARDS)
    trainer = grpo_trainer(advantage="rloo", scale_rewards="group")
    torch.testing.assert_close(trainer.advantages(rewards), rloo_advantages(rewards, 4, scale="group"))
    trainer = grpo_trainer(advantage="rloo", scale_rewards=None)
    torch.testing.assert_close(trainer.advantages(rewards), rloo_advantages(rewards, 4, scale="none"))


def gpt2_with_dropout():
    config = GPT2Config(vocab_size=len(TOK), n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.3,
                        embd_pdrop=0.3, attn_pdrop=0.3, bos_token_id=TOK.bos_token_id, eos_token_id=TOK.eos_token_id)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config)


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_without_dropout_the_first_update_has_ratio_one(architecture):
    """Old log-probs come from the rollout's no-gradient pass (eval mode), new ones from the update (train mode):
    with dropout on they differ, and the first update clips tokens it has not changed; switched off, they agree."""
    if architecture == "gpt2":
        model = gpt2_with_dropout()
    else:  # Llama-family attention passes a float attention_dropout to its kernel in training mode
        model = tiny(0)
        for module in model.modules():
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = 0.5
    exp = build_experience([PROMPTS[i // 4] for i in range(8)], RESPONSES, TOK.pad_token_id, TOK.eos_token_id, 6)
    advantages = torch.tensor(REWARDS) - 0.5

    def first_update_ratio_stats():
        old = batched_logprobs(model, exp, micro_batch_size=8)
        model.train()
        torch.manual_seed(1)
        new, _ = response_logprobs(model, exp)
        _, stats = clipped_policy_loss(new, old, advantages, exp.action_mask, 0.2)
        return old, new, stats

    old, new, stats = first_update_ratio_stats()
    assert (new - old).abs().max() > 1e-3 and stats["approx_kl"] > 0
    assert disable_dropout(model) > 0
    old, new, stats = first_update_ratio_stats()
    torch.testing.assert_close(new.detach(), old, atol=1e-6, rtol=0)
    assert stats["ratio_mean"].item() == pytest.approx(1.0, abs=1e-6) and stats["clip_frac_low"] == 0


def test_reward_errors_and_all_none_batches_are_counted_and_warned_once(monkeypatch, capsys):
    from rlhf.rewards.combine import RewardSet

    def nothing_applies(prompts, completions, **columns):
        return [None] * len(completions)

    def raises(prompts, completions, **columns):
        raise ValueError("bad sample")

    trainer = grpo_trainer()
    trainer.engine = FakeEngine(tiny(0))
    trainer.prompt_ids, trainer.prompt_texts = PROMPTS, ["ab", "c"]
    trainer.rows = [{"prompt": "ab", "answer": "1"}, {"prompt": "c", "answer": "2"}]
    trainer.rewards = RewardSet(["none", "raises"], [1.0, 1.0], on_error="score",
                                functions={"none": nothing_applies, "raises": raises})
    monkeypatch.setattr("rlhf.trainers.rl.generate", lambda *args, **kwargs: [list(r) for r in RESPONSES])
    stats = StepStats()
    for _ in range(2):
        trainer.sample([0, 1], stats, range(2))
    assert stats.reward_errors == 16 and stats.all_none == 0  # the raising function scored error_score
    trainer.rewards = RewardSet(["none"], functions={"none": nothing_applies})
    stats = StepStats()
    for _ in range(2):
        trainer.sample([0, 1], stats, range(2))
    assert stats.all_none == 16 and stats.reward_errors == 0
    assert capsys.readouterr().out.count("no reward function in reward.funcs") == 1
    metrics = trainer.reduce(stats).metrics(loss=0.0)
    assert metrics["reward/all_none"] == 16 and metrics["reward/errors"] == 0
    summary = trainer.summary({})
    assert summary["reward_all_none"] == 16 and summary["reward_errors"] == 0
    trainer.load_extra_state({"reward_totals": {"reward_errors": 5, "all_none": 1}})  # a resumed run keeps counting
    assert trainer.summary({})["reward_errors"] == 5
