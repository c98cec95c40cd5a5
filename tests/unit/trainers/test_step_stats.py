"""The typed record of an RL step: what it adds up, and the metric keys it names (in one place)."""

import pytest

from rlhf.trainers.step_stats import GRPOStepStats, PPOStepStats, StepStats, variance


def test_sums_become_means_and_functions_average_over_the_samples_they_applied_to():
    stats = StepStats(samples=4, reward=2.0, reward_sq=2.0, length=40, length_max=12, truncated=1, tokens=30,
                      entropy=15.0, clip_low=3.0, generate_s=2.0)
    stats.add_function("accuracy", 1.0, 2)
    stats.add_function("accuracy", 2.0, 2)  # a second sampling round of the same step
    with stats.timed("train_s"):
        pass
    metrics = stats.reduced().metrics(loss=0.25)
    assert metrics["reward/mean"] == 0.5 and metrics["reward/std"] == pytest.approx(0.5)
    assert metrics["reward/accuracy"] == 0.75 and metrics["response/length_mean"] == 10
    assert metrics["response/length_max"] == 12 and metrics["response/truncation_rate"] == 0.25
    assert metrics["entropy"] == 0.5 and metrics["clip_frac/low"] == 0.1 and metrics["loss"] == 0.25
    assert metrics["perf/completions_per_s"] == 2.0 and metrics["time/train_s"] >= 0.0


def test_grpo_and_ppo_add_their_own_keys():
    grpo = GRPOStepStats(groups=4, zero_variance=1, resample_rounds=2, tokens=10, kl=2.0).metrics(
        0.0, kl_name="k2", resampled=True, world=2)
    assert grpo["reward/zero_variance_frac"] == 0.25 and grpo["reward/resample_rounds"] == 1 and grpo["kl/k2"] == 0.2
    assert "reward/resample_rounds" not in GRPOStepStats().metrics(0.0)
    ppo = PPOStepStats(samples=2, action_tokens=4, returns=4.0, returns_sq=6.0, residual=0.0, residual_sq=1.0,
                       kl_k1=1.0, kl_k3=0.5).metrics(0.0, value_loss=0.3, kl_names=("k1", "k3"))
    assert ppo["value/explained_variance"] == pytest.approx(1 - 0.25 / 0.5) and ppo["value/loss"] == 0.3
    assert ppo["kl/k1"] == 0.5 and ppo["kl/k3"] == 0.25 and "kl/k2" not in ppo


def test_population_variance_never_goes_negative():
    assert variance(3.0, 5.0, 2) == pytest.approx(0.25) and variance(0.0, 0.0, 5) == 0.0 and variance(1, 1, 0) == 0
