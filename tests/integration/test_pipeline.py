"""`rlhf pipeline` end to end on a shrunk config: every stage reads the previous one's output, the report is
written, and a re-run skips what finished."""

import json

import yaml

from tests.integration.conftest import FAST, run_cli

STEPS = ["sft.trainer.max_steps=6", "train_rm.trainer.max_steps=4", "ppo.trainer.max_steps=2",
         "grpo.trainer.max_steps=2", "common.trainer.eval_every=0", "common.trainer.save_every=0",
         "grpo.trainer.prompts_per_step=4", "grpo.algo.group_size=2", "ppo.trainer.prompts_per_step=8",
         "ppo.trainer.micro_batch_size=4",
         "common.rollout.max_new_tokens=8", "report.eval.max_new_tokens=8", "report.eval.num_examples=8"]


def _fast_common() -> list[str]:
    # the RL and eval stages take no trainer.* of SFT's; everything else of FAST applies to every stage
    return [f"common.{o}" for o in FAST]


def test_pipeline_wires_stages_reports_and_skips_finished(tmp_path):
    root = tmp_path / "pipe"
    args = ["pipeline", f"run.dir={root}", *_fast_common(), *STEPS, "pipeline.rm_init=sft",
            "pipeline.stages=[sft,train_rm,ppo,grpo,sft_control,dpo]", "dpo.trainer.max_steps=2"]
    first = run_cli(*args)
    for stage in ("sft", "train_rm", "ppo", "grpo", "sft_control", "dpo"):
        assert (root / stage / "final").is_dir(), first.stdout
    config = {s: yaml.safe_load((root / s / "config.yaml").read_text()) for s in ("train_rm", "ppo", "grpo",
                                                                                  "sft_control")}
    sft_final = str(root / "sft" / "final")
    assert config["train_rm"]["model"]["name_or_path"] == sft_final
    assert config["ppo"]["model"]["name_or_path"] == sft_final
    assert config["ppo"]["reward"]["model_path"] == str(root / "train_rm" / "final")
    assert config["grpo"]["model"]["name_or_path"] == sft_final
    grpo_wall = json.loads((root / "grpo" / "summary.json").read_text())["wall_s"]
    assert config["sft_control"]["trainer"]["max_time_s"] == grpo_wall
    assert config["sft_control"]["model"]["name_or_path"] == sft_final

    summary = json.loads((root / "summary.json").read_text())
    stages = summary["stages"]
    for stage in ("sft", "ppo", "grpo"):
        assert {"accuracy", "format_rate", "kl", "wall_s"} <= set(stages[stage])
        assert 0.0 <= stages[stage]["accuracy"] <= 1.0
    assert {"pairwise_accuracy", "wall_s"} <= set(stages["train_rm"])
    assert {"accuracy", "wall_s"} <= set(stages["sft_control"])
    assert stages["sft"]["kl"] == 0.0  # the SFT checkpoint against itself
    report = (root / "report.md").read_text()
    assert "| checkpoint | held-out accuracy |" in report and "GRPO (verifier)" in report and "DPO (preference" in report
    assert "| RM score | RM AUC |" in report
    assert {"accuracy", "kl"} <= set(stages["dpo"])
    assert (root / "report.html").read_text().count("data:image/png;base64,") >= 3
    assert (root / "plots" / "accuracy_vs_time.png").is_file()

    again = run_cli(*args, "pipeline.workers=1")  # in this process: side by side is the first run's
    for stage in ("sft", "train_rm", "ppo", "grpo", "sft_control", "dpo"):
        assert f"pipeline: {stage} already finished" in again.stdout
    forced = run_cli(*args, "pipeline.force=[grpo]", "pipeline.report=false", "pipeline.workers=1")
    assert "pipeline: sft already finished" in forced.stdout
    assert "pipeline: grpo already finished" not in forced.stdout
    assert "pipeline: sft_control already finished" not in forced.stdout  # it reads grpo's wall time


def test_pipeline_refuses_a_stage_whose_input_is_missing(tmp_path):
    proc = run_cli("pipeline", f"run.dir={tmp_path / 'p'}", "pipeline.stages=[ppo]", check=False)
    assert proc.returncode != 0
    assert "ppo reads sft, train_rm" in proc.stderr


def test_plot_redraws_a_pipeline_directory(tmp_path):
    proc = run_cli("plot", str(tmp_path), check=False)
    assert proc.returncode != 0 and "no metrics.jsonl" in proc.stderr
