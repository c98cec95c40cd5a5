import json
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import pytest
from datasets import Dataset, DatasetDict
from omegaconf import OmegaConf

from rlhf.config import ArithmeticConfig, DataConfig
from rlhf.data import load_rows
from rlhf.data import loading
from rlhf.errors import DataError
from rlhf.rewards import accuracy_reward, format_reward

GSM8K = [
    {"question": f"Tom has {n} apples and buys {n} more. How many now?", "answer": f"{n}+{n}={2 * n}\n#### {2 * n}"}
    for n in range(1, 13)
]
HH = [
    {
        "chosen": f"\n\nHuman: What is {n}+1?\n\nAssistant: It is {n + 1}.",
        "rejected": f"\n\nHuman: What is {n}+1?\n\nAssistant: No idea.",
    }
    for n in range(10)
]


def write(path, rows):
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    elif suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    return path


def cfg(path, **kw):
    return DataConfig(path=str(path), **{"eval_size": 0, **kw})


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_gsm8k_layout_loads_from_every_file_type(tmp_path, suffix):
    path = write(tmp_path / f"gsm8k{suffix}", GSM8K)
    sft = load_rows(cfg(path), "sft", "train", seed=0)
    assert len(sft) == len(GSM8K)
    assert sft[1] == {"prompt": GSM8K[1]["question"], "completion": GSM8K[1]["answer"], "answer": "4"}
    prompts = load_rows(cfg(path), "prompt", "train", seed=0)
    assert prompts.column_names == ["prompt", "answer", "solution"]
    # The gold completions score as correct under the verifier the RL stage uses.
    assert accuracy_reward(prompts["prompt"], sft["completion"], answer=prompts["answer"]) == [1.0] * len(GSM8K)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_hh_rlhf_layout_loads_from_every_file_type(tmp_path, suffix):
    path = write(tmp_path / f"hh{suffix}", HH)
    ds = load_rows(cfg(path), "preference", "train", seed=0)
    assert ds.column_names == ["prompt", "chosen", "rejected"]
    assert ds[3] == {"prompt": "\n\nHuman: What is 3+1?\n\nAssistant:", "chosen": " It is 4.", "rejected": " No idea."}


def test_messages_and_column_mapping_from_a_file(tmp_path):
    rows = [
        {"conversation": [{"role": "user", "content": f"{n}+{n}="}, {"role": "assistant", "content": str(2 * n)}]}
        for n in range(4)
    ]
    path = write(tmp_path / "chat.jsonl", rows)
    ds = load_rows(cfg(path, columns={"messages": "conversation"}), "sft", "train", seed=0)
    assert ds[2]["prompt"] == [{"role": "user", "content": "2+2="}]
    assert ds[2]["completion"] == "4"


def test_the_composed_hydra_config_works_as_well_as_the_dataclass(tmp_path):
    path = write(tmp_path / "qa.jsonl", [{"q": "1+1=", "a": 2}, {"q": "2+2=", "a": 4}])
    config = OmegaConf.merge(
        OmegaConf.structured(DataConfig), {"path": str(path), "eval_size": 1, "columns": {"prompt": "q", "answer": "a"}}
    )
    train, held_out = load_rows(config, "prompt", "train", 0), load_rows(config, "prompt", "eval", 0)
    assert sorted(train.to_list() + held_out.to_list(), key=str) == [
        {"prompt": "1+1=", "answer": "2"},
        {"prompt": "2+2=", "answer": "4"},
    ]
    builtin = OmegaConf.merge(OmegaConf.structured(DataConfig), {"arithmetic": {"num_train": 5}})
    assert len(load_rows(builtin, "sft", "train", 0)) == 5


def test_held_out_rows_are_seeded_and_disjoint_from_training(tmp_path):
    path = write(tmp_path / "gsm8k.jsonl", GSM8K)
    config = cfg(path, eval_size=4)
    train = list(load_rows(config, "prompt", "train", seed=0)["prompt"])
    held_out = list(load_rows(config, "prompt", "eval", seed=0)["prompt"])
    assert len(train) == 8 and len(held_out) == 4
    assert sorted(train + held_out) == sorted(r["question"] for r in GSM8K)
    assert held_out == list(load_rows(config, "sft", "eval", seed=0)["prompt"])  # the same rows for every stage
    assert {tuple(load_rows(config, "prompt", "eval", seed=s)["prompt"]) for s in range(5)} != {tuple(held_out)}


def test_eval_size_zero_gives_an_empty_eval_set_with_the_training_columns(tmp_path):
    path = write(tmp_path / "gsm8k.jsonl", GSM8K)
    held_out = load_rows(cfg(path, eval_size=0), "sft", "eval", seed=0)
    assert len(held_out) == 0 and held_out.column_names == ["prompt", "completion", "answer"]
    assert len(load_rows(cfg(path, eval_size=0), "sft", "train", seed=0)) == len(GSM8K)


def test_eval_size_that_leaves_no_training_rows_is_an_error(tmp_path):
    path = write(tmp_path / "gsm8k.jsonl", GSM8K)
    with pytest.raises(DataError, match="data.eval_size=12 would leave no training rows out of 12"):
        load_rows(cfg(path, eval_size=12), "sft", "train", seed=0)


def test_a_directory_maps_train_and_test_files_to_splits(tmp_path):
    write(tmp_path / "train.jsonl", GSM8K[:8])
    write(tmp_path / "test.jsonl", GSM8K[8:])
    (tmp_path / "README.md").write_text("not data")
    config = cfg(tmp_path, eval_split="test")
    assert len(load_rows(config, "sft", "train", seed=0)) == 8
    assert load_rows(config, "sft", "eval", seed=0)["answer"] == ["18", "20", "22", "24"]
    with pytest.raises(DataError, match="no .jsonl files for split 'validation'; splits found: train, test"):
        load_rows(cfg(tmp_path, eval_split="validation"), "sft", "eval", seed=0)


def test_a_directory_of_shards_prefers_parquet_and_concatenates(tmp_path):
    write(tmp_path / "train-00000-of-00002.parquet", HH[:5])
    write(tmp_path / "train-00001-of-00002.parquet", HH[5:])
    (tmp_path / "dataset_info.json").write_text(json.dumps({"description": "metadata"}))
    ds = load_rows(cfg(tmp_path), "preference", "train", seed=0)
    assert len(ds) == 10 and ds[9]["chosen"] == " It is 10."


def test_a_directory_without_split_names_is_one_train_split(tmp_path):
    write(tmp_path / "a.csv", GSM8K[:6])
    write(tmp_path / "b.csv", GSM8K[6:])
    assert len(load_rows(cfg(tmp_path), "prompt", "train", seed=0)) == 12
    with pytest.raises(DataError, match="one 'train' split and has no 'test' split"):
        load_rows(cfg(tmp_path, eval_split="test"), "prompt", "eval", seed=0)


def test_save_to_disk_directories_load_by_split(tmp_path):
    DatasetDict({"train": Dataset.from_list(HH[:7]), "test": Dataset.from_list(HH[7:])}).save_to_disk(tmp_path / "dd")
    config = cfg(tmp_path / "dd", eval_split="test")
    assert len(load_rows(config, "preference", "train", 0)) == 7
    assert len(load_rows(config, "preference", "eval", 0)) == 3
    Dataset.from_list(GSM8K).save_to_disk(tmp_path / "single")
    assert len(load_rows(cfg(tmp_path / "single"), "prompt", "train", 0)) == 12


def test_a_single_file_has_no_named_eval_split(tmp_path):
    path = write(tmp_path / "gsm8k.jsonl", GSM8K)
    with pytest.raises(DataError, match="gsm8k.jsonl: a single file is one 'train' split"):
        load_rows(cfg(path, eval_split="test"), "prompt", "eval", seed=0)


def test_json_files_may_be_column_oriented_or_wrapped(tmp_path):
    columns = tmp_path / "columns.json"
    columns.write_text(json.dumps({"prompt": ["a", "b"], "answer": ["1", "2"]}))
    expected = [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}]
    assert load_rows(cfg(columns), "prompt", "train", 0).to_list() == expected
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [{"prompt": "a"}]}))
    assert load_rows(cfg(wrapped), "prompt", "train", 0)["prompt"] == ["a"]
    lines = tmp_path / "lines.json"
    lines.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    assert load_rows(cfg(lines), "prompt", "train", 0)["prompt"] == ["a", "b"]


def test_a_truncated_jsonl_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text(json.dumps(GSM8K[0]) + "\n" + json.dumps(GSM8K[1]) + "\n" + '{"question": "half a li')
    with pytest.raises(DataError, match=r"cut\.jsonl: line 3: invalid JSON .*truncated"):
        load_rows(cfg(path), "sft", "train", seed=0)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"prompt": "a"}, {"prompt": ')
    with pytest.raises(DataError, match=r"broken\.json: invalid JSON at line 1"):
        load_rows(cfg(broken), "prompt", "train", seed=0)


def test_non_utf8_bytes_name_the_file_offset_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl: not valid UTF-8 at byte 32 \(line 2\); re-encode"):
        load_rows(cfg(path), "prompt", "train", seed=0)
    csv = tmp_path / "latin1.csv"
    csv.write_bytes(b"prompt\nna\xefve\n")
    with pytest.raises(DataError, match=r"latin1\.csv: not valid UTF-8 at byte 9 \(line 2\)"):
        load_rows(cfg(csv), "prompt", "train", seed=0)


def test_a_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbfprompt,completion\n1+1=,2\n")
    assert load_rows(cfg(path), "sft", "train", 0).to_list() == [{"prompt": "1+1=", "completion": "2"}]


def test_empty_files_have_no_rows(tmp_path):
    for name in ("empty.jsonl", "empty.json"):
        path = tmp_path / name
        path.write_text("\n" if name.endswith("l") else "[]")
        with pytest.raises(DataError, match=rf"{name}: no rows"):
            load_rows(cfg(path), "sft", "train", seed=0)


def test_a_wrong_type_names_the_file_row_and_column(tmp_path):
    rows = [{"prompt": f"{n}+1=", "completion": str(n + 1)} for n in range(10)]
    rows[7]["completion"] = 8
    path = write(tmp_path / "typed.jsonl", rows)
    with pytest.raises(DataError, match=r"typed\.jsonl: column 'completion' is an int \(8\) at row 7"):
        load_rows(cfg(path), "sft", "train", seed=0)


def test_missing_columns_name_the_file_the_missing_and_present_columns(tmp_path):
    path = write(tmp_path / "pairs.parquet", [{"prompt": "p", "chosen": "a", "score": 1.0}])
    with pytest.raises(DataError) as err:
        load_rows(cfg(path), "preference", "train", seed=0)
    message = str(err.value)
    assert "pairs.parquet" in message and "missing column(s) rejected" in message
    assert "present: prompt, chosen, score" in message and "expected prompt+chosen+rejected" in message


def test_missing_local_paths_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        load_rows(cfg(tmp_path / "nope.jsonl"), "sft", "train", seed=0)
    text = tmp_path / "data.txt"
    text.write_text("hello")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_rows(cfg(text), "sft", "train", seed=0)


def test_unloadable_hub_names_are_data_errors(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/missing' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(loading.datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="'someone/missing' is neither a local file or directory nor a loadable hub"):
        load_rows(cfg("someone/missing"), "sft", "train", seed=0)


def test_hub_datasets_are_loaded_by_split_and_made_canonical(monkeypatch):
    calls = []

    def fake_load_dataset(path, subset, split):
        calls.append((path, subset, split))
        return Dataset.from_list(GSM8K[:3] if split == "test" else GSM8K[3:])

    monkeypatch.setattr(loading.datasets, "load_dataset", fake_load_dataset)
    config = DataConfig(path="openai/gsm8k", subset="main", eval_split="test", format="gsm8k")
    assert len(load_rows(config, "prompt", "train", 0)) == 9
    assert load_rows(config, "prompt", "eval", 0)["answer"] == ["2", "4", "6"]
    assert calls == [("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "test")]


def test_the_built_in_task_serves_every_kind_with_a_disjoint_eval_set():
    config = DataConfig(arithmetic=ArithmeticConfig(num_train=50, num_eval=20))
    kinds = {
        "sft": ["prompt", "completion", "answer"],
        "prompt": ["prompt", "answer"],
        "preference": ["prompt", "chosen", "rejected", "answer"],
    }
    for kind, columns in kinds.items():
        train, held_out = load_rows(config, kind, "train", 0), load_rows(config, kind, "eval", 0)
        assert (len(train), len(held_out)) == (50, 20)
        assert train.column_names == held_out.column_names == columns
        assert not set(train["prompt"]) & set(held_out["prompt"])
    held_out = load_rows(config, "sft", "eval", 0)
    assert accuracy_reward(held_out["prompt"], held_out["completion"], answer=held_out["answer"]) == [1.0] * 20
    assert format_reward(held_out["prompt"], held_out["completion"]) == [1.0] * 20


def test_built_in_task_with_no_eval_rows_and_unknown_tasks():
    empty = load_rows(DataConfig(arithmetic=ArithmeticConfig(num_eval=0)), "prompt", "eval", 0)
    assert len(empty) == 0 and empty.column_names == ["prompt", "answer"]
    with pytest.raises(DataError, match="unknown built-in task data.task='sudoku'; valid: arithmetic"):
        load_rows(DataConfig(task="sudoku"), "sft", "train", 0)
