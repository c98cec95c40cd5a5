"""Exact resume after SIGKILL, for every stage: a run killed at an arbitrary moment after its first checkpoint
and resumed with run.resume=true ends with the same final weights and the same metrics for every step as a run
that was never interrupted. Tolerance: 1e-6 absolute on weights and relative on metrics (fp32 on CPU). Most
runs agree bitwise; now and then the last updates differ by one or two float32 ULPs (~7e-9), from
floating-point reduction order rather than from any state the checkpoint misses (which would show as a
difference in the losses of the steps after it)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from rlhf.tracking import read_metrics
from tests.integration.conftest import FAST, REPO, run_cli

STAGES = {
    "sft": ["trainer.lr=1e-2"],
    "train-rm": ["data=arithmetic_prefs"],
    "dpo": ["trainer.lr=1e-3", "data.arithmetic.num_train=64"],
    "ppo": ["trainer.prompts_per_step=4", "rollout.max_new_tokens=8", "algo.ppo_epochs=2", "algo.mini_batches=1",
            "trainer.micro_batch_size=4", "algo.adaptive_kl=true"],
    "grpo": ["trainer.prompts_per_step=2", "algo.group_size=4", "rollout.max_new_tokens=8",
             "reward.funcs=[tests.integration.rewards_for_tests:varied]", "reward.weights=[1.0]",
             "trainer.micro_batch_size=4", "algo.num_iterations=2"],
    # LoRA: checkpoints hold the adapters and their optimizer state only; the reference is the base, adapters off
    "grpo lora": ["model.lora.r=4", "trainer.prompts_per_step=2", "algo.group_size=4", "rollout.max_new_tokens=8",
                  "reward.funcs=[tests.integration.rewards_for_tests:varied]", "reward.weights=[1.0]",
                  "trainer.micro_batch_size=4", "algo.beta=0.1", "trainer.lr=1e-2"],
}
COMMON = ["trainer.max_steps=12", "trainer.save_every=2", "trainer.keep_last=10", "trainer.eval_every=0"]


def _kill_after_first_checkpoint(args: list[str], run_dir) -> None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.Popen([sys.executable, "-m", "rlhf.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (run_dir / "checkpoints" / "latest").exists():
        time.sleep(0.05)
    time.sleep(0.05)  # somewhere after the first checkpoint: mid-step or mid-save of a later one
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_resume_after_sigkill_matches_an_uninterrupted_run(stage, tmp_path):
    args = [stage.split()[0], *FAST, *COMMON, *STAGES[stage]]
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_cli(*args, f"run.dir={full}")
    _kill_after_first_checkpoint([*args, f"run.dir={killed}"], killed)
    assert not (killed / "summary.json").exists(), "the run finished before it was killed"
    run_cli(*args, f"run.dir={killed}", "run.resume=true")

    def per_step(run_dir):
        records = [r for r in read_metrics(run_dir) if "loss" in r]
        return {r["step"]: {k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in records}

    a, b = per_step(full), per_step(killed)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert a.keys() == b.keys()
    for step in a:
        assert a[step].keys() == b[step].keys()
        for key, value in a[step].items():
            assert b[step][key] == (pytest.approx(value, rel=1e-6, abs=1e-9) if isinstance(value, float) else value), \
                (step, key)
    wa, wb = _weights(full), _weights(killed)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6, msg=key)
