import pytest

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
    out = run_cli("sft", "launcher.nproc_per_node=2", "launcher.dry_run=true", f"run.dir={tmp_path}/r").stdout
    assert out.startswith("deepspeed --master_port 29500 --num_gpus 2 --no_local_rank --module rlhf.cli sft")
    assert f"run.dir={tmp_path}/r" in out
