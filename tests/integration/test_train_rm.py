import json

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from rlhf.rewards.model import INFO_FILE, RewardModel
from tests.integration.conftest import run_cli
from tests.tiny_models import save_tiny_bert_classifier

pytestmark = pytest.mark.slow

TINY = ["model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.intermediate_size=64",
        "trainer.micro_batch_size=8", "trainer.warmup_steps=1", "logger.progress=false"]


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_train_rm_end_to_end_and_final_loads_with_plain_transformers(tmp_path, fast):
    run_dir = tmp_path / "rm"
    proc = run_cli("train-rm", f"run.dir={run_dir}", "trainer.max_steps=4", "trainer.eval_every=2",
                   "trainer.save_every=2", "trainer.lr=3e-3", *fast)
    out = proc.stdout + proc.stderr
    assert "batch: micro 8 x accum 1 x world 1 = global 8 rows/step (pairs; 64 train, 16 held out)" in out
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "curves.png", "checkpoints/latest",
                 "final/config.json", f"final/{INFO_FILE}"):
        assert (run_dir / name).exists(), name

    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 4]
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 and r["lm_loss"] > 0 for r in records if "loss" in r)
    for key in ("eval/loss", "eval/pairwise_accuracy", "eval/margin", "eval/chosen_mean", "eval/chosen_std",
                "eval/rejected_mean", "eval/rejected_std"):
        assert key in records[0] and key in records[2] and key in records[-1], key
    assert "eval/ranking_accuracy" not in records[-1]  # pairs only

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stage"] == "train_rm" and summary["steps"] == 4
    assert 0.0 <= summary["pairwise_accuracy"] <= 1.0
    assert summary["pairwise_accuracy"] == records[-1]["eval/pairwise_accuracy"]

    # final/ is a one-label sequence classifier that plain transformers loads and runs.
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    assert model.config.num_labels == 1 and model.config.architectures == ["LlamaForSequenceClassification"]
    info = json.loads((run_dir / "final" / INFO_FILE).read_text())
    assert info["score"] == "last_token" and info["num_scores"] == 128 and info["std"] > 0
    texts = ["12+34=<think>4+2=6,3+1=4</think><answer>46</answer><eos>", "7+8=<answer>15</answer><eos>"]
    batch = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        plain = model(**batch).logits[:, 0]
    # ... and scores exactly as rlhf's own scorer does (the char tokenizer's pad is not its EOS).
    ours = RewardModel.from_pretrained(run_dir / "final").score_texts(
        ["12+34=", "7+8="], ["<think>4+2=6,3+1=4</think><answer>46</answer>", "<answer>15</answer>"])
    torch.testing.assert_close(plain.tolist(), ours, atol=1e-5, rtol=0)

    # rlhf eval scores the saved model on the same held-out pairs and agrees with the training run.
    eval_dir = tmp_path / "eval"
    run_cli("eval", f"model.name_or_path={run_dir / 'final'}", f"run.dir={eval_dir}", "data.arithmetic.num_eval=16")
    scored = json.loads((eval_dir / "summary.json").read_text())
    assert scored["kind"] == "reward_model" and scored["rows"] == 16
    assert scored["pairwise_accuracy"] == pytest.approx(summary["pairwise_accuracy"])
    assert scored["margin"] == pytest.approx(summary["margin"], abs=1e-5)
    assert len((eval_dir / "scores.jsonl").read_text().splitlines()) == 16


def test_bad_preference_rows_are_counted_and_skipped_or_refused(tmp_path):
    good = [{"prompt": f"{a}+{a}=", "chosen": str(2 * a), "rejected": str(2 * a + 1)} for a in range(12)]
    bad = [{"prompt": "1+1=", "chosen": "2", "rejected": "2"}, {"prompt": "1+2=", "chosen": "3", "rejected": " "}]
    data = write_jsonl(tmp_path / "prefs.jsonl", good + bad)
    common = ["data=local", f"data.path={data}", "data.eval_size=0", "trainer.max_steps=2", *TINY]
    proc = run_cli("train-rm", f"run.dir={tmp_path / 'drop'}", *common)
    assert "dropped 2 of 14 preference rows with identical or empty responses" in proc.stdout + proc.stderr

    proc = run_cli("train-rm", f"run.dir={tmp_path / 'error'}", "algo.on_invalid=error", *common, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "preference row" in proc.stderr and ("identical" in proc.stderr or "empty" in proc.stderr)

    missing = write_jsonl(tmp_path / "missing.jsonl", [{"prompt": "1+1=", "chosen": "2"}] * 8)
    proc = run_cli("train-rm", f"run.dir={tmp_path / 'missing'}", "data=local", f"data.path={missing}", *TINY,
                   check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "missing column(s) rejected" in proc.stderr


def test_ranked_lists_listwise_with_per_token_sum_score(tmp_path):
    rows = [{"prompt": f"{a}+1=", "responses": [str(a + 1), str(a + 2), f"{a + 3}?"][: 2 + a % 2]} for a in range(20)]
    data = write_jsonl(tmp_path / "ranked.jsonl", rows)
    run_dir = tmp_path / "ranked"
    run_cli("train-rm", f"run.dir={run_dir}", "data=local", f"data.path={data}", "data.eval_size=6",
            "algo.loss=listwise", "algo.score=sum", "algo.center_coef=0.01", "trainer.max_steps=3",
            "trainer.eval_every=0", *TINY)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0.0 <= summary["ranking_accuracy"] <= 1.0 and 0.0 <= summary["pairwise_accuracy"] <= 1.0
    assert json.loads((run_dir / "final" / INFO_FILE).read_text())["score"] == "sum"
    # A sum-scored model is scored as a sum by rlhf eval without being told.
    eval_dir = tmp_path / "eval"
    run_cli("eval", f"model.name_or_path={run_dir / 'final'}", f"run.dir={eval_dir}", "data=local",
            f"data.path={data}")
    scored = json.loads((eval_dir / "summary.json").read_text())
    assert scored["score"] == "sum" and scored["rows"] == 20 and "ranking_accuracy" in scored


def test_a_prompt_run_once_for_its_responses_trains_the_same_step(tmp_path):
    """trainer.shared_prefix (on by default) runs each row's prompt once for all of its responses: the step's loss,
    language-modelling loss, accuracy and gradient norm are those of one pass per response."""
    rows = [{"prompt": f"{'what is ' * (a % 3)}{a}+1=", "responses": [str(a + 1), str(a + 2) * (1 + a % 4), "?"][: 2 + a % 2]}
            for a in range(20)]
    data = write_jsonl(tmp_path / "ranked.jsonl", rows)
    steps = {}
    for shared in (True, False):
        run_dir = tmp_path / f"shared_{shared}"
        run_cli("train-rm", f"run.dir={run_dir}", "data=local", f"data.path={data}", "data.eval_size=4",
                "algo.score=sum", "trainer.max_steps=1", "trainer.eval_every=0", f"trainer.shared_prefix={shared}",
                *TINY)
        steps[shared] = [r for r in read_metrics(run_dir) if "grad_norm" in r][0]
    assert steps[True]["lm_loss"] > 0
    for key in ("loss", "lm_loss", "grad_norm", "train/pairwise_accuracy", "train/margin"):
        assert steps[True][key] == pytest.approx(steps[False][key], rel=1e-4, abs=1e-6), key


def test_hh_rlhf_conversations_with_margins(tmp_path):
    rows = [{"chosen": f"\n\nHuman: {a}+1?\n\nAssistant: {a + 1}", "rejected": f"\n\nHuman: {a}+1?\n\nAssistant: no",
             "margin": 0.5} for a in range(16)]
    data = write_jsonl(tmp_path / "hh.jsonl", rows)
    run_dir = tmp_path / "hh"
    run_cli("train-rm", f"run.dir={run_dir}", "data=local", f"data.path={data}", "data.eval_size=4",
            "data.max_prompt_length=32", "algo.label_smoothing=0.1", "trainer.max_steps=2", "trainer.eval_every=0",
            *TINY)
    assert 0.0 <= json.loads((run_dir / "summary.json").read_text())["pairwise_accuracy"] <= 1.0
    proc = run_cli("train-rm", f"run.dir={tmp_path / 'listwise'}", "data=local", f"data.path={data}",
                   "data.eval_size=4", "data.max_prompt_length=32", "algo.loss=listwise", *TINY, check=False)
    assert proc.returncode == 2 and "algo.use_margin=false" in proc.stderr


def test_eval_scores_a_policy_and_needs_a_model(tmp_path, fast):
    proc = run_cli("eval", f"run.dir={tmp_path / 'none'}", check=False)
    assert proc.returncode == 2 and "rlhf eval needs model.name_or_path=" in proc.stderr
    run_cli("sft", f"run.dir={tmp_path / 'sft'}", "trainer.max_steps=1", "trainer.eval_every=0", *fast)
    eval_dir = tmp_path / "eval"
    run_cli("eval", f"model.name_or_path={tmp_path / 'sft' / 'final'}", f"run.dir={eval_dir}", "data=arithmetic",
            "data.arithmetic.num_eval=8", "eval.max_new_tokens=8")
    summary = json.loads((eval_dir / "summary.json").read_text())
    assert summary["kind"] == "policy" and summary["rows"] == 8 and 0.0 <= summary["format_rate"] <= 1.0
    assert (eval_dir / "eval_samples.jsonl").exists()
    proc = run_cli("eval", f"model.name_or_path={tmp_path / 'sft' / 'final'}", f"run.dir={eval_dir}", check=False)
    assert proc.returncode == 2 and "run.overwrite=true" in proc.stderr


def test_encoder_classifier_trains_and_scores(tmp_path):
    """A BERT-style reward model (its own pooling head) given by model.name_or_path."""
    save_tiny_bert_classifier(tmp_path / "bert")
    run_dir = tmp_path / "rm"
    proc = run_cli("train-rm", f"run.dir={run_dir}", f"model.name_or_path={tmp_path / 'bert'}",
                   "data.arithmetic.num_train=32", "data.arithmetic.num_eval=8", "trainer.max_steps=2", *TINY)
    assert "the language-modelling regulariser is off: BertForSequenceClassification" in proc.stdout + proc.stderr
    assert 0.0 <= json.loads((run_dir / "summary.json").read_text())["pairwise_accuracy"] <= 1.0
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "final")
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 1
    proc = run_cli("train-rm", f"run.dir={tmp_path / 'sum'}", f"model.name_or_path={tmp_path / 'bert'}",
                   "algo.score=sum", "data.arithmetic.num_train=32", *TINY, check=False)
    assert proc.returncode == 2 and "use algo.score=last_token" in proc.stderr
