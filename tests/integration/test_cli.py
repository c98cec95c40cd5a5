import os
import shlex
import subprocess
import sys

import pytest
import typer

from rlhf import cli
from tests.integration.conftest import run_cli


def test_help_lists_stages():
    out = run_cli("--help").stdout
    assert "sft" in out and "Supervised fine-tuning" in out


def test_stage_help_lists_groups_and_overrides():
    out = run_cli("sft", "--help").stdout
    assert "Hydra overrides" in out
    assert "deepspeed: zero0, zero1, zero2, zero2_offload, zero3, zero3_offload" in out


def test_cfg_job_prints_resolved_config():
    out = run_cli("sft", "--cfg", "job", "trainer.lr=0.25").stdout
    assert "stage: sft" in out and "lr: 0.25" in out


@pytest.mark.parametrize("override, message", [
    ("trainer.lrr=1", "unknown config key 'trainer.lrr'. Did you mean trainer.lr?"),
    ("model=gpt9", "unknown option 'gpt9' for config group 'model'"),
    ("trainer.max_steps=many", "trainer.max_steps: expected integer"),
    ("model.dtype=bf32", "model.dtype='bf32': expected one of fp32, bf16, fp16"),
])
def test_config_errors_exit_nonzero_with_one_line(override, message):
    proc = run_cli("sft", override, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {proc.stderr.strip().removeprefix('error: ')}"]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_model_directory_is_a_clear_error(tmp_path):
    proc = run_cli("sft", f"model.name_or_path={tmp_path}/nope", f"run.dir={tmp_path}/run", check=False)
    assert proc.returncode == 2
    assert f"{tmp_path}/nope" in proc.stderr and "Traceback" not in proc.stderr


def test_launcher_dry_run_prints_the_deepspeed_command(tmp_path):
    # PATH without the venv's bin/ (an unactivated `.venv/bin/rlhf`): the launcher runs on this interpreter.
    out = run_cli("sft", "launcher.nproc_per_node=2", "launcher.dry_run=true", f"run.dir={tmp_path}/r",
                  env={"PATH": "/usr/bin:/bin"}).stdout
    assert shlex.split(out.splitlines()[0]) == [
        sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", "29500", "--num_gpus", "2",
        "--no_local_rank", "--module", "rlhf.cli", "sft", "launcher.nproc_per_node=2", "launcher.dry_run=true",
        f"run.dir={tmp_path}/r", f"run.dir={tmp_path}/r"]


def test_the_launcher_runs_from_the_interpreter_without_path():
    proc = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--help"], capture_output=True,
                          text=True, env={**os.environ, "PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 0 and "--no_local_rank" in proc.stdout and "--module" in proc.stdout


def test_the_printed_launch_command_is_the_one_run(tmp_path, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd: ran.append(cmd) or 0)
    for var in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(typer.Exit):
        cli.run_stage("grpo", ["launcher.nproc_per_node=2", f"run.dir={tmp_path}/r"])
    assert len(ran) == 1 and shlex.split(capsys.readouterr().out.splitlines()[0]) == ran[0]


def test_a_config_error_answers_before_heavy_imports():
    """`rlhf grpo algo.loss_type=nope` exits 2 naming the choices without loading torch (python -X importtime)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "rlhf.cli", "grpo", "algo.loss_type=nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error: algo.loss_type='nope': expected one of grpo, bnpo, dapo, dr_grpo" in proc.stderr
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "import time" in line}
    assert not {"torch", "transformers", "datasets", "deepspeed"} & imported


@pytest.mark.parametrize("command", [["grpo", "--cfg", "job"], ["pipeline", "--cfg", "job"]])
def test_cfg_job_imports_no_heavy_library(command):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "rlhf.cli", *command], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "stage:" in proc.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "import time" in line}
    assert not {"torch", "transformers", "datasets", "deepspeed"} & imported


def test_reward_funcs_alone_get_one_weight_each():
    out = run_cli("grpo", "--cfg", "job", "reward.funcs=[tests.integration.rewards_for_tests:varied]").stdout
    assert "- tests.integration.rewards_for_tests:varied\n  weights:\n  - 1.0\n" in out
