import json

import pytest
from transformers import AutoModelForCausalLM

from tests.integration.conftest import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory):
    from tests.integration.conftest import FAST

    run_dir = tmp_path_factory.mktemp("sft") / "run"
    run_cli("sft", f"run.dir={run_dir}", "trainer.max_steps=3", "trainer.eval_every=0", *FAST)
    return run_dir / "final"


def test_grpo_end_to_end_from_an_sft_checkpoint(tmp_path, fast, sft_checkpoint):
    run_dir = tmp_path / "grpo"
    proc = run_cli("grpo", f"run.dir={run_dir}", f"model.name_or_path={sft_checkpoint}", "trainer.max_steps=2",
                   "trainer.eval_every=1", "trainer.prompts_per_step=4", "algo.group_size=4",
                   "trainer.micro_batch_size=8", "rollout.max_new_tokens=12", "algo.num_iterations=2", *fast)
    assert "4 prompts x group 4 = 16 samples/step" in proc.stdout + proc.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "reward/mean" in r]
    assert len(train) == 2
    for r in train:
        for key in ("loss", "reward/accuracy", "reward/format", "reward/std", "reward/zero_variance_frac",
                    "kl/k3", "entropy", "clip_frac/low", "clip_frac/high", "response/length_mean",
                    "response/truncation_rate", "time/step_s"):
            assert key in r, key
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stage"] == "grpo" and 0.0 <= summary["accuracy"] <= 1.0
    AutoModelForCausalLM.from_pretrained(run_dir / "final")


def test_grpo_refuses_a_group_of_one(tmp_path, fast):
    proc = run_cli("grpo", f"run.dir={tmp_path}/r", "algo.group_size=1", *fast, check=False)
    assert proc.returncode == 2 and "algo.group_size=1" in proc.stderr and "Traceback" not in proc.stderr


def test_grpo_beta_zero_loads_no_reference(tmp_path, fast, sft_checkpoint):
    run_dir = tmp_path / "grpo"
    run_cli("grpo", f"run.dir={run_dir}", f"model.name_or_path={sft_checkpoint}", "trainer.max_steps=1",
            "trainer.eval_every=0", "trainer.prompts_per_step=2", "algo.group_size=4", "trainer.micro_batch_size=8",
            "rollout.max_new_tokens=8", "algo.beta=0", *fast)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not any("kl/k3" in r for r in records)
