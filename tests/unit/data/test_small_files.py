"""data.eval_size=null (the default) adapts to small files: a few rows held out, the rest trained on."""

import json

import pytest

from rlhf.config import DataConfig
from rlhf.data import load_rows
from rlhf.errors import DataError

ROWS = {
    "prompt": lambda n: {"prompt": f"{n}+1=", "answer": str(n + 1)},
    "sft": lambda n: {"prompt": f"{n}+1=", "completion": str(n + 1)},
    "preference": lambda n: {"prompt": f"{n}+1=", "chosen": str(n + 1), "rejected": str(n)},
}


def jsonl(path, kind, n):
    path.write_text("".join(json.dumps(ROWS[kind](i)) + "\n" for i in range(n)), encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", list(ROWS))
@pytest.mark.parametrize("rows, held_out", [(120, 12), (5, 1), (2, 1), (1, 0)])
def test_the_default_eval_size_holds_out_a_few_rows_of_a_small_file(tmp_path, capsys, kind, rows, held_out):
    config = DataConfig(path=str(jsonl(tmp_path / f"{kind}.jsonl", kind, rows)))
    train = load_rows(config, kind, "train", seed=0)
    printed = capsys.readouterr().out
    evaluation = load_rows(config, kind, "eval", seed=0)
    assert (len(train), len(evaluation)) == (rows - held_out, held_out)
    assert sorted([*train["prompt"], *evaluation["prompt"]]) == sorted(f"{i}+1=" for i in range(rows))
    assert evaluation.column_names == train.column_names
    assert printed.count("\n") == 1
    assert f"holding out {held_out} of its {rows} rows for evaluation, training on {rows - held_out}" in printed
    assert capsys.readouterr().out == ""  # said once, when the training rows load


def test_the_default_holds_out_at_most_200_and_says_nothing_when_it_does(tmp_path, capsys):
    config = DataConfig(path=str(jsonl(tmp_path / "p.jsonl", "prompt", 2500)))
    assert len(load_rows(config, "prompt", "eval", seed=0)) == 200
    assert len(load_rows(config, "prompt", "train", seed=0)) == 2300
    assert capsys.readouterr().out == ""


def test_an_explicit_eval_size_is_taken_as_asked(tmp_path, capsys):
    path = jsonl(tmp_path / "p.jsonl", "prompt", 12)
    assert len(load_rows(DataConfig(path=str(path), eval_size=6), "prompt", "eval", seed=0)) == 6
    assert len(load_rows(DataConfig(path=str(path), eval_size=11), "prompt", "train", seed=0)) == 1
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("kind", list(ROWS))
def test_an_explicit_eval_size_that_leaves_no_training_rows_is_an_error(tmp_path, kind):
    path = jsonl(tmp_path / f"{kind}.jsonl", kind, 120)
    with pytest.raises(DataError, match=rf"{kind}.jsonl: data.eval_size=150 would leave no training rows out of 120"):
        load_rows(DataConfig(path=str(path), eval_size=150), kind, "train", seed=0)
    one = jsonl(tmp_path / "one.jsonl", kind, 1)
    with pytest.raises(DataError, match="data.eval_size=1 would leave no training rows out of 1"):
        load_rows(DataConfig(path=str(one), eval_size=1), kind, "train", seed=0)
