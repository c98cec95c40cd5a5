import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.integration.conftest import run_cli

pytestmark = pytest.mark.slow


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sft_end_to_end_writes_a_complete_run(tmp_path, fast):
    run_dir = tmp_path / "sft"
    proc = run_cli("sft", f"run.dir={run_dir}", "trainer.max_steps=4", "trainer.eval_every=2",
                   "trainer.save_every=2", *fast)
    assert "batch: micro 8 x accum 1 x world 1 = global 8 rows/step" in proc.stdout + proc.stderr
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "curves.png", "eval_samples.jsonl",
                 "checkpoints/latest", "final/config.json"):
        assert (run_dir / name).exists(), name

    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 4]
    assert all("time/step_s" in r for r in records)
    train = [r for r in records if "loss" in r]
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 for r in train)
    assert "eval/accuracy" in records[0] and "eval/loss" in records[2]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stage"] == "sft" and summary["steps"] == 4
    assert 0.0 <= summary["accuracy"] <= 1.0 and 0.0 <= summary["format_rate"] <= 1.0
    assert summary["eval_loss"] < summary["initial"]["eval_loss"]

    # final/ is plain Hugging Face: loads without rlhf and generates.
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    tok = AutoTokenizer.from_pretrained(run_dir / "final")
    ids = tok("12+34=", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_00000002", "step_00000004"]


def test_sft_resume_continues_exactly(tmp_path, fast):
    common = ["trainer.max_steps=6", "trainer.save_every=3", "trainer.keep_last=5", "trainer.eval_every=0",
              "trainer.lr=1e-2", *fast]
    full, part = tmp_path / "full", tmp_path / "part"
    run_cli("sft", f"run.dir={full}", *common)
    shutil.copytree(full, part)  # the same run again: training is deterministic on CPU
    # Make `part` look like a run killed after step 6 whose last finished checkpoint is step 3: what came
    # later is gone, and metrics.jsonl holds lines past the checkpoint that the resumed run must replace.
    for name in ("final", "summary.json", "checkpoints/step_00000006"):
        path = part / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    (part / "checkpoints" / "latest").write_text("step_00000003")
    proc = run_cli("sft", f"run.dir={part}", *common, "run.resume=true")
    assert "resumed from" in proc.stdout + proc.stderr

    a, b = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    losses = lambda rs: [(r["step"], r["loss"]) for r in rs if "loss" in r]  # noqa: E731
    assert losses(a) == losses(b)
    wa = AutoModelForCausalLM.from_pretrained(full / "final").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(part / "final").state_dict()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=0)


def test_existing_run_dir_is_not_overwritten(tmp_path, fast):
    run_dir = tmp_path / "sft"
    run_cli("sft", f"run.dir={run_dir}", "trainer.max_steps=1", "trainer.eval_every=0", *fast)
    before = (run_dir / "metrics.jsonl").read_text()
    proc = run_cli("sft", f"run.dir={run_dir}", "trainer.max_steps=1", *fast, check=False)
    assert proc.returncode == 2
    assert "already holds a run" in proc.stderr and "run.overwrite=true" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_wandb_offline_logs_and_keeps_its_run_id(tmp_path, fast):
    run_dir = tmp_path / "sft"
    args = ["sft", f"run.dir={run_dir}", "trainer.max_steps=2", "trainer.eval_every=0", "trainer.save_every=1",
            "logger=wandb", *fast]
    run_cli(*args)
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    runs = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert runs and any(runs[0].glob("*.wandb"))
    run_cli(*args[:-len(fast) - 1], "logger=wandb", "trainer.max_steps=3", "run.resume=true", *fast)
    assert (run_dir / "wandb_id.txt").read_text().strip() == run_id
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) == 2


def test_max_time_stops_training_and_still_exports(tmp_path, fast):
    run_cli("sft", f"run.dir={tmp_path}", *fast, "trainer.max_steps=1000", "trainer.max_time_s=0")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 0 and (tmp_path / "final" / "config.json").is_file()
