"""Bad input, end to end: every case exits non-zero with one `error:` line that says what is wrong and where,
prints no traceback, and leaves the user's files (data, models, other runs) as they were."""

import hashlib
import json
from pathlib import Path

import pytest

from tests.integration.conftest import FAST, run_cli


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _demos(path: Path, n: int = 8) -> Path:
    return _jsonl(path, [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(n)])


def _causal_lm(tmp: Path) -> Path:
    """A saved tiny causal LM with its tokenizer, as the project's zoo writes one (no training needed to refuse)."""
    from omegaconf import OmegaConf

    from rlhf.config import ModelConfig
    from rlhf.engine.checkpoint import save_pretrained
    from rlhf.models.zoo import load_policy, load_tokenizer

    cfg = OmegaConf.structured(ModelConfig)
    cfg.tiny.hidden_size, cfg.tiny.num_layers, cfg.tiny.intermediate_size = 32, 1, 64
    tokenizer = load_tokenizer(cfg)
    path = tmp / "lm"
    save_pretrained(load_policy(cfg, tokenizer, seed=0), tokenizer, path)
    return path


def case_missing_column(tmp):
    data = _jsonl(tmp / "d.jsonl", [{"question": "1+1=", "completion": "2"}])
    return ["sft", "data=local", f"data.path={data}"], ["d.jsonl", "prompt"]


def case_wrong_type(tmp):
    data = _jsonl(tmp / "d.jsonl", [{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2=", "completion": 4}])
    return ["sft", "data=local", f"data.path={data}"], ["completion"]


def case_empty_file(tmp):
    data = tmp / "d.jsonl"
    data.write_text("")
    return ["sft", "data=local", f"data.path={data}"], ["d.jsonl"]


def case_truncated_jsonl(tmp):
    data = _jsonl(tmp / "d.jsonl", [{"prompt": "1+1=", "completion": "2"}, '{"prompt": "2+2=", "compl'])
    return ["sft", "data=local", f"data.path={data}"], ["d.jsonl", "line 2"]


def case_non_utf8(tmp):
    data = tmp / "d.jsonl"
    data.write_bytes(b'{"prompt": "1+1=", "completion": "2"}\n{"prompt": "\xff\xfe", "completion": "4"}\n')
    return ["sft", "data=local", f"data.path={data}"], ["d.jsonl", "UTF-8"]


def case_long_prompt(tmp):
    data = _jsonl(tmp / "d.jsonl", [{"prompt": "1" * 40 + "+1=", "completion": "2"}] * 8)
    return ["sft", "data=local", f"data.path={data}", "data.max_prompt_length=8", "data.on_long_prompt=error",
            "data.eval_size=2"], \
        ["max_prompt_length"]


def case_missing_data_file(tmp):
    return ["sft", "data=local", f"data.path={tmp}/nope.jsonl"], [f"{tmp}/nope.jsonl"]


def case_missing_model(tmp):
    return ["sft", f"model.name_or_path={tmp}/no_model"], [f"{tmp}/no_model"]


def case_model_without_tokenizer(tmp):
    lm = _causal_lm(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (lm / name).unlink(missing_ok=True)
    return ["sft", f"model.name_or_path={lm}"], ["tokenizer"]


def case_reward_model_not_a_classifier(tmp):
    lm = _causal_lm(tmp)
    return ["ppo", "reward=model", f"reward.model_path={lm}", "trainer.prompts_per_step=8",
            "trainer.micro_batch_size=4", "reward.normalize=false"], \
        [str(lm), "sequence classifier"]


def case_unknown_reward_function(tmp):
    return ["grpo", "reward.funcs=[accuracy,nonesuch]", "reward.weights=[1.0,1.0]"], ["nonesuch"]


def case_reward_weights_mismatch(tmp):
    return ["grpo", "reward.funcs=[accuracy,format]", "reward.weights=[1.0]"], ["reward.weights"]


def case_reward_function_raises(tmp):
    return ["grpo", "reward.funcs=[tests.integration.rewards_for_tests:raises]", "reward.weights=[1.0]",
            "trainer.prompts_per_step=2", "algo.group_size=2", "rollout.max_new_tokens=4",
            "trainer.micro_batch_size=4"], ["raises", "completion"]


def case_negative_lr(tmp):
    return ["sft", "trainer.lr=-0.001"], ["trainer.lr=-0.001", "> 0"]


def case_group_size_one(tmp):
    return ["grpo", "algo.group_size=1"], ["algo.group_size=1"]


def case_clip_epsilon_zero(tmp):
    return ["ppo", "algo.epsilon=0"], ["algo.epsilon=0"]


def case_zero_micro_batch(tmp):
    return ["sft", "trainer.micro_batch_size=0"], ["trainer.micro_batch_size=0"]


def case_unknown_key(tmp):
    return ["grpo", "algo.betta=0"], ["algo.betta", "algo.beta"]


def case_wrong_value_type(tmp):
    return ["sft", "trainer.max_steps=lots"], ["trainer.max_steps"]


def case_identical_preference(tmp):
    data = _jsonl(tmp / "p.jsonl", [{"prompt": "1+1=", "chosen": "2", "rejected": "2"},
                                    {"prompt": "2+2=", "chosen": "4", "rejected": "5"}])
    return ["train-rm", "data=local", f"data.path={data}", "algo.on_invalid=error"], ["p.jsonl"]


def case_resume_without_checkpoint(tmp):
    return ["sft", "run.resume=true"], ["no finished checkpoint"]


def case_existing_run_directory(tmp):
    (tmp / "run" / "final").mkdir(parents=True)
    (tmp / "run" / "final" / "model.safetensors").write_bytes(b"weights the user trained")
    return ["sft"], ["already holds a run", "run.overwrite=true"]


def case_eval_missing_model(tmp):
    data = _jsonl(tmp / "p.jsonl", [{"prompt": "1+1=", "completion": "2"}])
    return ["eval", f"model.name_or_path={tmp}/nope", "data=local", f"data.path={data}"], [f"{tmp}/nope"]


def case_prompts_without_the_answer_the_accuracy_reward_needs(tmp):
    data = _jsonl(tmp / "p.jsonl", [{"prompt": f"{i}+1=", "gold": str(i + 1)} for i in range(8)])
    return ["grpo", "data=local", f"data.path={data}", "data.eval_size=2"], ["p.jsonl", "`accuracy`", "`answer`"]


def case_dpo_identical_preference(tmp):
    data = _jsonl(tmp / "p.jsonl", [{"prompt": "1+1=", "chosen": "2", "rejected": "2"},
                                    {"prompt": "2+2=", "chosen": "4", "rejected": "5"}])
    return ["dpo", "data=local", f"data.path={data}", "algo.on_invalid=error"], ["p.jsonl"]


def case_dpo_rows_without_a_rejected_response(tmp):
    data = _jsonl(tmp / "p.jsonl", [{"prompt": f"{i}+1=", "chosen": str(i + 1)} for i in range(4)])
    return ["dpo", "data=local", f"data.path={data}"], ["p.jsonl", "rejected"]


def case_negative_lora_rank(tmp):
    return ["grpo", "model.lora.r=-1"], ["model.lora.r=-1", ">= 0"]


CASES = {name.removeprefix("case_"): fn for name, fn in globals().items() if name.startswith("case_")}


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "run" not in p.relative_to(root).parts[:1]}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_refused_clearly_and_loses_nothing(name, tmp_path):
    args, expected = CASES[name](tmp_path)
    before = _snapshot(tmp_path)
    run_before = _snapshot_run(tmp_path / "run")
    proc = run_cli(args[0], *FAST, *args[1:], f"run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert error, proc.stderr
    for part in expected:
        assert part in error[-1], error[-1]
    assert _snapshot(tmp_path) == before  # the user's data and models are untouched
    assert _snapshot_run(tmp_path / "run") == run_before or not run_before


def _snapshot_run(run: Path) -> dict[str, str]:
    if not run.is_dir():
        return {}
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and p.name != "config.yaml"}


def test_extra_columns_are_ignored(tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": f"{i}+1=", "completion": str(i + 1), "source": "x", "id": i}
                                         for i in range(8)])
    run_cli("sft", "data=local", f"data.path={data}", f"run.dir={tmp_path / 'run'}", *FAST, "trainer.max_steps=1",
            "trainer.eval_every=0", "data.eval_size=2")
    assert (tmp_path / "run" / "final" / "config.json").is_file()
