"""A reward that needs a data column says so when the rows load, naming the file, the reward and the column."""

import json

import pytest

from rlhf.config import DataConfig
from rlhf.data import load_rows
from rlhf.errors import DataError, RewardError
from rlhf.rewards import accuracy_reward
from rlhf.rewards.rules import REQUIRED_COLUMNS, REWARD_FUNCS, check_columns


def test_accuracy_without_an_answer_column_names_the_file_reward_column_and_the_way_out():
    with pytest.raises(DataError) as error:
        check_columns(["accuracy", "format"], ["prompt", "question"], "data/prompts.jsonl")
    assert str(error.value) == (
        "data/prompts.jsonl: reward `accuracy` needs column `answer` (the reference answer), which the rows do not "
        "have; columns: prompt, question. Map yours with data.columns={answer: <your column>} or drop accuracy from "
        "reward.funcs")


def test_every_missing_column_is_named_at_once():
    with pytest.raises(DataError, match=r"reward `accuracy` needs column `answer` \(the reference answer\); reward "
                                        r"`code` needs column `tests` .*data.columns=\{answer: <your column>, tests: "
                                        r"<your column>\} or drop accuracy, code from reward.funcs"):
        check_columns(["accuracy", "code"], ["prompt"], "mbpp.jsonl")


@pytest.mark.parametrize("funcs", [["accuracy", "format"], ["format", "length"], ["model"], ["my_pkg.rewards:score"]])
def test_rewards_whose_columns_are_there_or_that_need_none_pass(funcs):
    check_columns(funcs, ["prompt", "answer"], "prompts.jsonl")
    check_columns([f for f in funcs if f != "accuracy"], ["prompt"], "prompts.jsonl")


def test_every_declared_reward_is_a_registered_one():
    import rlhf.rewards  # noqa: F401  (registers `code`)

    assert set(REQUIRED_COLUMNS) <= set(REWARD_FUNCS.names())


def test_the_declaration_matches_what_the_reward_reads():
    with pytest.raises(RewardError, match="`answer`"):
        accuracy_reward(["1+1="], ["<answer>2</answer>"])
    assert accuracy_reward(["1+1="], ["<answer>2</answer>"], answer=["2"]) == [1.0]


def test_loaded_rows_are_checked_as_canonical_columns_so_a_mapping_satisfies_it(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{n}+1=", "gold": str(n + 1)}) + "\n" for n in range(4)))
    rows = load_rows(DataConfig(path=str(path), eval_size=0), "prompt", "train", seed=0)
    with pytest.raises(DataError, match=rf"^{path}: reward `accuracy` needs column `answer`.*columns: prompt, gold\."):
        check_columns(["accuracy"], rows.column_names, str(path))
    mapped = load_rows(DataConfig(path=str(path), eval_size=0, columns={"answer": "gold"}), "prompt", "train", seed=0)
    check_columns(["accuracy"], mapped.column_names, str(path))
