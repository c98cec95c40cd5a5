"""DAPO's dynamic sampling in the GRPO trainer: flat groups are dropped and more prompts drawn until the quota."""

import torch
from omegaconf import OmegaConf

from rlhf.config import GRPOConfig
from rlhf.data.sampler import StepSampler
from rlhf.trainers.grpo import GRPOTrainer
from rlhf.trainers.rl import Samples
from rlhf.trainers.step_stats import GRPOStepStats


def trainer_with_rounds(rounds, zero_variance="resample", resample_rounds=3, oversample=1.0):
    cfg = OmegaConf.structured(GRPOConfig)
    cfg.algo.group_size, cfg.trainer.prompts_per_step = 2, 2
    cfg.algo.zero_variance, cfg.algo.resample_rounds, cfg.algo.oversample = zero_variance, resample_rounds, oversample
    trainer = GRPOTrainer(cfg)
    trainer.sampler = StepSampler(100, seed=0)
    rewards = iter(rounds)

    def fake_sample(indices, stats, positions):
        r = next(rewards)
        rows = [i for i in indices for _ in range(2)]
        return Samples([[i] for i in rows], [[7, len(r)]] * len(rows), list(r), rows)

    trainer.sample = fake_sample
    return trainer


def test_resample_keeps_groups_with_signal_until_the_quota_is_met():
    # round 1: group A flat, group B has signal; round 2: both flat; round 3: two with signal (one is spare)
    trainer = trainer_with_rounds([[1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 2.0, 2.0], [5.0, 6.0, 3.0, 4.0]])
    stats = GRPOStepStats()
    samples, keep = trainer.collect(stats)
    assert samples.rewards == [0.0, 1.0, 5.0, 6.0] and keep.tolist() == [True] * 4
    assert stats.resample_rounds == 2 and stats.zero_variance == 3 and stats.groups == 6
    assert trainer.samples_seen == 6  # every drawn prompt counts as seen, so a resumed run draws fresh ones


def test_resample_gives_up_after_its_rounds_and_masks_the_flat_filler():
    trainer = trainer_with_rounds([[1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 2.0, 2.0]], resample_rounds=1)
    samples, keep = trainer.collect(GRPOStepStats())
    assert samples.rewards == [0.0, 1.0, 1.0, 1.0] and keep.tolist() == [True, True, False, False]


def test_skip_masks_flat_groups_without_resampling():
    trainer = trainer_with_rounds([[1.0, 1.0, 0.0, 1.0]], zero_variance="skip")
    samples, keep = trainer.collect(GRPOStepStats())
    assert samples.rewards == [1.0, 1.0, 0.0, 1.0] and keep.tolist() == [False, False, True, True]
    assert torch.is_tensor(keep)


def test_oversample_draws_more_prompts_in_one_round():
    # 2 prompts a step, oversample 2: one round of 4 groups, two of which carry signal - the quota in one call
    trainer = trainer_with_rounds([[1.0, 1.0, 0.0, 1.0, 2.0, 2.0, 3.0, 4.0]], oversample=2.0)
    stats = GRPOStepStats()
    samples, keep = trainer.collect(stats)
    assert samples.rewards == [0.0, 1.0, 3.0, 4.0] and keep.tolist() == [True] * 4
    assert stats.resample_rounds == 0 and stats.groups == 4 and trainer.samples_seen == 4
