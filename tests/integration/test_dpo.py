"""`rlhf dpo` end to end on the tiny model: the policy starts as its reference (loss log 2, implicit rewards 0), the
preference metrics and the policy's held-out answers are logged, final/ loads, and a bad setting is refused."""

import json
import math

import pytest
from transformers import AutoModelForCausalLM

from tests.integration.conftest import run_cli

pytestmark = pytest.mark.slow

PAIRS = ["data.arithmetic.num_train=64", "data.arithmetic.num_eval=16", "trainer.max_steps=3", "trainer.eval_every=2"]


def test_dpo_end_to_end(tmp_path, fast):
    run_dir = tmp_path / "dpo"  # the reference's log-probs computed once and kept (the live reference: test_exact_resume)
    run_cli("dpo", f"run.dir={run_dir}", *fast, *PAIRS, "algo.precompute_reference=true")
    assert (run_dir / "reference_logps.pt").is_file()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if "loss" in r)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "grad_norm"):
        assert key in first, key
    # the policy is its reference at the first step: h = 0, loss -log sigmoid(0). The reference's log-probs were
    # computed before training, over other micro-batches (other packs, other matmul shapes): equal to rounding.
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and abs(first["rewards/margin"]) < 1e-5
    assert {"eval/rewards/accuracy", "eval/accuracy"} <= set(records[-1])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stage"] == "dpo" and 0 <= summary["rewards_accuracy"] <= 1 and "accuracy" in summary
    AutoModelForCausalLM.from_pretrained(run_dir / "final")


def test_dpo_refuses_a_beta_of_zero(tmp_path):
    proc = run_cli("dpo", f"run.dir={tmp_path}/r", "algo.beta=0", check=False)
    assert proc.returncode == 2 and "algo.beta=0" in proc.stderr and "Traceback" not in proc.stderr


def test_dpo_with_lora_starts_at_its_reference_and_exports_merged_weights_and_the_adapter(tmp_path, fast):
    """With model.lora.r the reference is the policy's base, adapters off: at the first step the policy equals it
    (loss log 2, as with a second copy); final/ is a plain model with the adapters folded in, final/adapter/ the
    adapter peft loads onto the base."""
    run_dir = tmp_path / "dpo"
    proc = run_cli("dpo", f"run.dir={run_dir}", *fast, *PAIRS, "model.lora.r=4", "trainer.lr=1e-2")
    assert "LoRA r=4" in proc.stdout + proc.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and train[0]["rewards/margin"] == 0
    assert train[-1]["rewards/margin"] != 0, "the adapters moved the policy away from its base"
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    adapter = json.loads((run_dir / "final" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["peft_type"] == "LORA"
    assert not any("lora" in name for name, _ in merged.named_parameters())
