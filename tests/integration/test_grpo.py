import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.integration.conftest import REPO, run_cli

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
                    "response/truncation_rate", "time/step_s", "reward/errors", "reward/all_none"):
            assert key in r, key
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stage"] == "grpo" and 0.0 <= summary["accuracy"] <= 1.0
    assert summary["reward_errors"] == 0 and summary["reward_all_none"] == sum(r["reward/all_none"] for r in train)
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


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_dapo_loss_does_not_depend_on_how_the_step_is_split(tmp_path, fast, sft_checkpoint):
    """One micro-batch of 8 and four of 2 give the same step: the same loss and the same accumulated gradient; and
    so does running every row's prompt on its own (trainer.shared_prefix=false) instead of once per group."""
    runs = {}
    for name, micro, shared in (("8", 8, True), ("2", 2, True), ("8 unshared", 8, False)):
        run_dir = tmp_path / f"micro{micro}_{shared}"
        run_cli("grpo", f"run.dir={run_dir}", f"model.name_or_path={sft_checkpoint}", "trainer.max_steps=1",
                "trainer.eval_every=0", "trainer.prompts_per_step=2", "algo.group_size=4", "rollout.max_new_tokens=12",
                "algo.loss_type=dapo", "reward.funcs=[tests.integration.rewards_for_tests:varied]", "reward.weights=[1]",
                "algo.beta=0.04", *fast, f"trainer.micro_batch_size={micro}", f"trainer.shared_prefix={shared}")
        runs[name] = [r for r in read_metrics(run_dir) if "grad_norm" in r][0]
    assert runs["8"]["reward/std"] > 0
    for other in ("2", "8 unshared"):
        assert runs["8"]["reward/mean"] == runs[other]["reward/mean"]  # the same samples
        for key in ("loss", "kl/k3", "entropy"):
            assert runs["8"][key] == pytest.approx(runs[other][key], rel=1e-4, abs=1e-6), (other, key)
        assert runs["8"]["grad_norm"] == pytest.approx(runs[other]["grad_norm"], rel=1e-4), other


def test_grpo_on_a_local_file_in_gsm8k_layout(tmp_path, fast, sft_checkpoint):
    data = tmp_path / "gsm8k"
    data.mkdir()
    for split, n in (("train", 16), ("test", 4)):
        rows = [{"question": f"Tom has {i} apples and buys {i + 2} more. How many now?",
                 "answer": f"He has {i} + {i + 2} = {2 * i + 2} apples.\n#### {2 * i + 2:,}"} for i in range(n)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp_path / "grpo"
    run_cli("grpo", f"run.dir={run_dir}", f"model.name_or_path={sft_checkpoint}", "data=gsm8k", f"data.path={data}",
            "data.prompt_template='{prompt}'", "data.max_prompt_length=96", "trainer.max_steps=1", "trainer.eval_every=1",
            "trainer.prompts_per_step=2", "algo.group_size=4", "rollout.max_new_tokens=8", *fast)
    train = [r for r in read_metrics(run_dir) if "reward/mean" in r][0]
    assert "reward/accuracy" in train and train["reward/all_none"] == 0  # the gold answer reached the verifier
    assert "eval/accuracy" in read_metrics(run_dir)[0]


def test_dynamic_sampling_resamples_flat_groups_and_overlong_penalty_is_logged(tmp_path, fast, sft_checkpoint):
    run_dir = tmp_path / "grpo"
    run_cli("grpo", f"run.dir={run_dir}", f"model.name_or_path={sft_checkpoint}", "trainer.max_steps=1",
            "trainer.eval_every=0", "trainer.prompts_per_step=2", "algo.group_size=4", "rollout.max_new_tokens=8",
            "algo.zero_variance=resample", "algo.resample_rounds=2", "reward.overlong_buffer=4", *fast)
    train = [r for r in read_metrics(run_dir) if "reward/mean" in r][0]
    assert 0 <= train["reward/resample_rounds"] <= 2 and "reward/zero_variance_frac" in train
    assert train["reward/overlong"] < 0  # the barely trained model's 8-token responses ran into the limit


def test_grpo_with_the_code_reward_on_a_local_file_in_mbpp_layout(tmp_path, fast, sft_checkpoint):
    data = tmp_path / "mbpp"
    data.mkdir()
    for split in ("train", "test"):
        rows = [{"text": f"Write add{i}(a, b).", "code": f"def add{i}(a, b):\n    return a + b",
                 "test_list": [f"assert add{i}(1, 2) == 3"]} for i in range(4)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp_path / "grpo"
    run_cli("grpo", f"run.dir={run_dir}", f"model.name_or_path={sft_checkpoint}", "data=mbpp", f"data.path={data}",
            "data.subset=null", "data.prompt_template='{prompt}\n{tests}'", "data.max_prompt_length=96",
            "reward=code", "reward.code.timeout_s=2", "trainer.max_steps=1", "trainer.eval_every=0",
            "trainer.prompts_per_step=2", "algo.group_size=4", "rollout.max_new_tokens=8", *fast)
    train = [r for r in read_metrics(run_dir) if "reward/mean" in r][0]
    assert train["reward/code"] == 0.0 and train["reward/all_none"] == 0  # scored (and failed), not skipped


def test_vllm_rollouts_sample_what_hf_samples_with_the_weights_of_every_update(tmp_path, fast, sft_checkpoint):
    """rollout.engine=vllm against a stand-in vLLM (tests/fake_vllm: random weights at start, rlhf's own seeded
    sampler): only a run that loads the policy's weights before every step's rollout trains the weights hf trains."""
    fake = str(REPO / "tests" / "fake_vllm")
    runs = {}
    for engine in ("hf", "vllm"):
        run_dir = tmp_path / engine
        proc = run_cli("grpo", f"run.dir={run_dir}", f"model.name_or_path={sft_checkpoint}", "trainer.max_steps=3",
                       "trainer.eval_every=0", "trainer.prompts_per_step=4", "algo.group_size=4", "trainer.lr=1e-3",
                       "rollout.max_new_tokens=12", "reward.funcs=[tests.integration.rewards_for_tests:varied]",
                       "reward.weights=[1.0]", f"rollout.engine={engine}", *fast,
                       env={"PYTHONPATH": os.pathsep.join([fake, str(REPO)])})
        runs[engine] = (run_dir, proc.stdout + proc.stderr)
    assert runs["vllm"][1].count("fake vllm: weights loaded") == 3  # one load per step, each after an update
    rewards = {e: [json.loads(line).get("reward/mean") for line in (d / "metrics.jsonl").read_text().splitlines()]
               for e, (d, _) in runs.items()}
    assert rewards["vllm"] == rewards["hf"]
    hf, vllm = (AutoModelForCausalLM.from_pretrained(runs[e][0] / "final").state_dict() for e in ("hf", "vllm"))
    before = AutoModelForCausalLM.from_pretrained(sft_checkpoint).state_dict()
    assert any(not torch.equal(hf[k], before[k]) for k in hf)  # the steps learned something
    for key in hf:
        torch.testing.assert_close(vllm[key], hf[key], rtol=0, atol=1e-6)
