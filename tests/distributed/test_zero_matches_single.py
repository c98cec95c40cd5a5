"""Every stage under 2 processes (ZeRO-2 and ZeRO-3) computes what one process computes with the same global
batch: the same per-step metrics (relative 1e-3, or 1e-6 absolute for values near 0) and the same final weights
(1e-5 absolute; measured: 1e-6 or less, while the updates themselves move weights by 2e-4 to 8e-4). fp32 on CPU.

The five stages run as one `rlhf pipeline` under `deepspeed --num_gpus 2 --module rlhf.cli` (one launch, the
stages in-process): the 1-process run accumulates two micro-batches where the 2-process run has one per rank,
and RL sampling is seeded per sample (rollout.seeded), so both see the same responses."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf.tracking import read_metrics
from rlhf.engine.distributed import SHARED_MEMORY_DIR, SHARED_MEMORY_PREFIX
from tests.integration.conftest import REPO, run_cli, run_process

pytestmark = pytest.mark.slow

STAGES = ("sft", "train_rm", "ppo", "grpo", "dpo")
ARGS = [
    *(f"common.{o}" for o in (
        "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.intermediate_size=64",
        "data.arithmetic.num_train=64", "data.arithmetic.num_eval=16", "trainer.micro_batch_size=4",
        "trainer.warmup_steps=1", "eval.max_new_tokens=8", "eval.num_examples=16", "logger.progress=false",
        "trainer.eval_every=0", "trainer.save_every=0", "rollout.max_new_tokens=8")),
    "sft.trainer.max_steps=3", "sft.trainer.save_every=2", "sft.trainer.keep_last=5", "train_rm.trainer.max_steps=3",
    "ppo.trainer.max_steps=2", "ppo.trainer.prompts_per_step=8", "ppo.algo.mini_batches=1",
    "grpo.trainer.max_steps=2", "grpo.trainer.save_every=1", "grpo.trainer.keep_last=5",
    "grpo.trainer.prompts_per_step=4", "grpo.algo.group_size=2", "grpo.algo.beta=0.04",
    # resample fills each rank's quota from that rank's own draws: once a group is redrawn, 2 processes train on
    # another (equally valid) batch than 1 process. skip drops the same flat groups from the same global batch.
    "grpo.algo.zero_variance=skip",
    "grpo.reward.funcs=[tests.integration.rewards_for_tests:varied]", "grpo.reward.weights=[1.0]",
    "dpo.trainer.max_steps=2", "dpo.data.arithmetic.num_train=32",
    "pipeline.stages=[sft,train_rm,ppo,grpo,dpo]", "pipeline.report=false",
    # ZeRO-3 can run neither the LM term nor length buckets, and one single-process run serves both stages
    "train_rm.algo.lm_coef=0", "train_rm.trainer.group_by_length=false",
]
SINGLE = ["sft.trainer.grad_accum=2", "train_rm.trainer.grad_accum=2",  # = 2 ranks x 1 micro-batch of 4
          "dpo.trainer.grad_accum=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(*args: str) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus 2 --module rlhf.cli ...`, as a user launches by hand; checks the run left none of
    DeepSpeed's shared-memory buffers (69 MB of RAM per rank, each) behind."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    port = _free_port()
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--no_local_rank", "--master_port",
           str(port), "--module", "rlhf.cli", *args]
    proc = run_process(cmd, cwd=REPO, env={**env, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "deepspeed_shm_comm" in proc.stdout + proc.stderr  # the collective whose buffers are checked below
    assert not list(SHARED_MEMORY_DIR.glob(f"{SHARED_MEMORY_PREFIX}_*_{port}_*"))
    return proc


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("single") / "pipe"
    run_cli("pipeline", f"run.dir={root}", *ARGS, *SINGLE, "common.deepspeed=zero0")
    return root


def weights(run_dir: Path) -> dict:
    return load_file(next(run_dir.glob("*.safetensors")))


# 1 - Var(R - V) / Var(R): near 0 its absolute error is the ratio's relative error (1e-6 to 1e-5 between runs),
# not a fraction of its own small value.
ABSOLUTE_TOLERANCE = {"value/explained_variance": 1e-5}


def assert_same_run(a: Path, b: Path, stage: str) -> None:
    ma, mb = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    for ra, rb in zip(ma, mb):
        for key, value in ra.items():
            if isinstance(value, float) and not key.startswith(("time/", "perf/")):
                assert rb[key] == pytest.approx(value, rel=1e-3, abs=ABSOLUTE_TOLERANCE.get(key, 1e-6)), \
                    (stage, ra["step"], key)
    wa, wb = weights(a / "final"), weights(b / "final")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert (wa[name].float() - wb[name].float()).abs().max() < 1e-5, (stage, name)


@pytest.fixture(scope="module", params=["zero2", "zero3"])
def two(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param) / "pipe"
    proc = run_two_processes("pipeline", f"run.dir={root}", *ARGS, f"common.deepspeed={request.param}")
    frozen = [line for line in (proc.stdout + proc.stderr).splitlines() if "ZeRO-3 inference engine" in line]
    # ppo's reference and reward model, grpo's reference: sharded like the policy under ZeRO-3 only
    assert len(frozen) == (2 if request.param == "zero3" else 0), frozen
    assert request.param == "zero2" or "reference and reward model partitioned over 2" in frozen[0]
    return request.param, root


@pytest.mark.parametrize("stage", STAGES)
def test_two_processes_match_one(single, two, stage):
    zero, root = two
    config = yaml.safe_load((root / stage / "config.yaml").read_text())
    assert config["deepspeed"]["config"]["zero_optimization"]["stage"] == int(zero[-1])
    assert_same_run(single / stage, root / stage, f"{zero}/{stage}")


def test_zero3_final_loads_with_plain_transformers(two):
    zero, root = two
    if zero != "zero3":
        pytest.skip("the ZeRO-3 gather path")
    AutoModelForCausalLM.from_pretrained(root / "sft" / "final")
    AutoModelForSequenceClassification.from_pretrained(root / "train_rm" / "final")


def cut_back(root: Path, stage: str, step: int, dest: Path) -> Path:
    """A copy of a finished pipeline whose `stage` is cut back to its step-`step` checkpoint, as if killed there."""
    shutil.copytree(root, dest)
    run = dest / stage
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    keep = f"step_{step:08d}"
    for later in [p for p in (run / "checkpoints").glob("step_*") if p.name != keep]:
        shutil.rmtree(later)
    (run / "checkpoints" / "latest").write_text(keep)
    return dest


# (stage, checkpoint step) resumed from each 2-process run
RESUMED = {"zero2": ("grpo", 1), "zero3": ("sft", 2)}


def test_a_two_process_run_resumes_exactly_on_two_processes_and_on_one(two, tmp_path):
    """Resumed on 2 processes, and on 1 (DeepSpeed's universal format re-partitions the optimizer state): both end
    where the uninterrupted run ended. RL samples are seeded by position in the data stream, so the resumed GRPO
    run draws the same responses on any number of processes."""
    zero, root = two
    stage, step = RESUMED[zero]
    on_two = cut_back(root, stage, step, tmp_path / "two")
    only = f"pipeline.stages=[{stage}]"  # (its input stages are finished in the copy; later ones would re-run)
    proc = run_two_processes("pipeline", f"run.dir={on_two}", *ARGS, f"common.deepspeed={zero}", only)
    output = proc.stdout + proc.stderr
    assert "run.resume=true" in output and f"resumed from {on_two / stage}" in output
    assert output.count(f"pipeline: {stage}:") == 1  # one rank speaks
    assert_same_run(root / stage, on_two / stage, f"{zero}/{stage} resumed on 2")

    on_one = cut_back(root, stage, step, tmp_path / "one")
    proc = run_cli("pipeline", f"run.dir={on_one}", *ARGS, *SINGLE, f"common.deepspeed={zero}", only)
    assert "universal format" in proc.stdout + proc.stderr
    assert_same_run(root / stage, on_one / stage, f"{zero}/{stage} resumed on 1")
    checkpoints = on_one / stage / "checkpoints"
    state = json.loads((checkpoints / (checkpoints / "latest").read_text() / "trainer_state.json").read_text())
    assert state["world_size"] == 1
    assert state["samples_seen"] == max(r.get("samples_seen", 0) for r in read_metrics(root / stage))


def test_lora_under_zero2_on_two_processes_matches_one(tmp_path):
    """LoRA adapters with the reference as the base, adapters off: 2 processes under ZeRO-2 train what one trains
    (the merged final/ included); ZeRO-3 is refused before any work, with the error that says why."""
    args = ["dpo", "model.lora.r=4", "trainer.lr=1e-2", "trainer.max_steps=2", "data.arithmetic.num_train=32",
            *(o.removeprefix("common.") for o in ARGS if o.startswith("common.") and "rollout." not in o)]
    run_cli(*args, f"run.dir={tmp_path / 'one'}", "trainer.grad_accum=2")
    run_two_processes(*args, f"run.dir={tmp_path / 'two'}", "deepspeed=zero2")
    assert_same_run(tmp_path / "one", tmp_path / "two", "dpo lora")
    refused = run_cli(*args, f"run.dir={tmp_path / 'three'}", "deepspeed=zero3", check=False)
    assert refused.returncode != 0 and "model.lora.r=4 under ZeRO-3 is not supported" in refused.stderr
