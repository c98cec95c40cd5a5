import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from tests.integration.conftest import FAST, run_cli

pytestmark = pytest.mark.slow

SMALL = ["trainer.prompts_per_step=8", "trainer.micro_batch_size=4", "rollout.max_new_tokens=12"]


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A cold-start policy and a reward model trained from it: the InstructGPT chain in miniature."""
    root = tmp_path_factory.mktemp("chain")
    run_cli("sft", f"run.dir={root}/sft", "trainer.max_steps=3", "trainer.eval_every=0", *FAST)
    run_cli("train-rm", f"run.dir={root}/rm", f"model.name_or_path={root}/sft/final", "trainer.max_steps=2",
            "trainer.eval_every=0", "data.arithmetic.num_train=64", "data.arithmetic.num_eval=16",
            "trainer.micro_batch_size=8", "logger.progress=false")
    return root / "sft" / "final", root / "rm" / "final"


def test_ppo_against_a_reward_model_end_to_end(tmp_path, fast, checkpoints):
    policy, reward_model = checkpoints
    run_dir = tmp_path / "ppo"
    proc = run_cli("ppo", f"run.dir={run_dir}", f"model.name_or_path={policy}", "reward=model",
                   f"reward.model_path={reward_model}", "trainer.max_steps=2", "trainer.eval_every=1",
                   "algo.ppo_epochs=2", "algo.mini_batches=2", "algo.adaptive_kl=true", "algo.kl_target=0.5",
                   *fast, *SMALL)
    out = proc.stdout + proc.stderr
    assert "8 prompts x 1 = 8 samples/step" in out and "2 pass(es) x 2 mini-batch(es)" in out
    assert "critic from reward_model" in out
    train = [r for r in read_metrics(run_dir) if "reward/mean" in r]
    assert len(train) == 2
    for r in train:
        for key in ("loss", "reward/model", "reward/shaped", "value/loss", "value/mean", "value/explained_variance",
                    "value/clip_frac", "kl/k1", "kl/k3", "kl_coef", "policy/approx_kl", "entropy", "clip_frac/low", "clip_frac/high", "grad_norm", "grad_norm/critic",
                    "response/length_mean", "response/truncation_rate"):
            assert key in r, key
    assert train[0]["kl_coef"] != 0.05 or train[1]["kl_coef"] != 0.05  # the adaptive controller moved it
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stage"] == "ppo" and "kl" in summary
    AutoModelForCausalLM.from_pretrained(run_dir / "final")
    critic = AutoModelForSequenceClassification.from_pretrained(run_dir / "final" / "critic")
    assert critic.config.num_labels == 1
    # The critic started from the reward model and was trained: its weights moved.
    rm = AutoModelForSequenceClassification.from_pretrained(reward_model)
    assert not torch.equal(critic.score.weight, rm.score.weight)


def test_ppo_with_rules_starts_the_critic_from_the_policy_and_resumes(tmp_path, fast, checkpoints):
    policy, _ = checkpoints
    run_dir = tmp_path / "ppo"
    args = [f"run.dir={run_dir}", f"model.name_or_path={policy}", "trainer.eval_every=0", "trainer.save_every=1",
            "algo.kl_in=loss", "algo.kl_estimator=k3", "critic.warmup_steps=1", *fast, *SMALL]
    proc = run_cli("ppo", "trainer.max_steps=1", *args)
    assert "critic from policy" in proc.stdout + proc.stderr
    first = read_metrics(run_dir)
    assert "value/loss" in first[0] and "loss" not in first[0]  # critic warm-up: the policy waits
    run_cli("ppo", "trainer.max_steps=2", "run.resume=true", *args)
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if "reward/mean" in r] == [1, 2]
    assert "loss" in [r for r in records if r["step"] == 2][0]


@pytest.mark.parametrize("override, message", [
    ("algo.kl_in=both", "algo.kl_in='both'"),
    ("algo.truncation=never", "algo.truncation='never'"),
    ("critic.init=reward_model", "critic.init=reward_model needs reward.model_path"),
    ("reward=model", "reward.model_path is not set"),
])
def test_ppo_refuses_bad_settings_clearly(tmp_path, fast, override, message):
    proc = run_cli("ppo", f"run.dir={tmp_path}/r", override, *fast, check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_ppo_adaptive_kl_refuses_a_non_positive_target(tmp_path, fast):
    proc = run_cli("ppo", f"run.dir={tmp_path}/r", "algo.adaptive_kl=true", "algo.kl_target=0", *fast, check=False)
    assert proc.returncode == 2 and "algo.kl_target" in proc.stderr


def test_ppo_with_dense_per_token_rewards_keeps_each_response_total(tmp_path, fast, checkpoints):
    policy, _ = checkpoints
    run_cli("train-rm", f"run.dir={tmp_path}/rm", f"model.name_or_path={policy}", "algo.score=sum",
            "trainer.max_steps=2", "trainer.eval_every=0", "data.arithmetic.num_train=64",
            "data.arithmetic.num_eval=16", "trainer.micro_batch_size=8", "logger.progress=false")
    run_dir = tmp_path / "ppo"
    run_cli("ppo", f"run.dir={run_dir}", f"model.name_or_path={policy}", "reward=model",
            f"reward.model_path={tmp_path}/rm/final", "reward.dense=true", "algo.kl_coef=0", "trainer.max_steps=1",
            "trainer.eval_every=0", *fast, *SMALL)
    train = [r for r in read_metrics(run_dir) if "reward/mean" in r][0]
    # without a KL penalty the per-token rewards of a response add up to its reward model score
    assert train["reward/shaped"] == pytest.approx(train["reward/mean"], abs=1e-4)
    assert "kl/k1" not in train  # kl_coef=0: no reference model


def test_dense_rewards_need_a_summed_score_model(tmp_path, fast, checkpoints):
    policy, reward_model = checkpoints
    proc = run_cli("ppo", f"run.dir={tmp_path}/r", f"model.name_or_path={policy}", "reward=model",
                   f"reward.model_path={reward_model}", "reward.dense=true", "trainer.max_steps=1", *fast, *SMALL,
                   check=False)
    assert proc.returncode == 2 and "algo.score=sum" in proc.stderr
