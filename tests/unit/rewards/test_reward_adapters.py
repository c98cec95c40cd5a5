import pytest

from rlhf.config import load_config
from rlhf.errors import ConfigError, RewardError
from rlhf.rewards.adapters import detect_api, verl_ground_truth
from rlhf.rewards.combine import RewardSet
from rlhf.rewards.rules import length_reward
from tests.unit.rewards import reward_styles as styles

M = "tests.unit.rewards.reward_styles"
PROMPTS = ["Q: 1+1?\nA:", "Q: 2+3?\nA:"]


@pytest.fixture(autouse=True)
def _clear_calls():
    styles.CALLS.clear()


def test_auto_detects_each_style():
    assert detect_api(styles.trl_contains_answer) == "trl"
    assert detect_api(styles.compute_score) == "verl"
    assert detect_api(styles.gsm8k_style) == "verl"
    assert detect_api(styles.reward_func) == "openrlhf"
    assert detect_api(styles.anything) == "trl"  # nothing to go on
    assert detect_api(len) == "trl"  # a builtin: no signature to read

    def both(queries, prompts, labels, solution_str, ground_truth):
        return 0.0

    assert detect_api(both) == "trl"  # ambiguous


def test_trl_function_gets_prompts_completions_and_columns():
    out = RewardSet([f"{M}:trl_contains_answer"])(PROMPTS, ["it is 2", "it is 6"], {"answer": ["2", "5"],
                                                                                    "level": [1, 2]})
    assert out.total == [1.0, 0.0]
    call = styles.CALLS[0]
    assert call["prompts"] == PROMPTS and call["completions"] == ["it is 2", "it is 6"]
    assert call["answer"] == ["2", "5"] and call["kwargs"] == {"level": [1, 2]}


def test_trl_function_gets_conversational_completions_as_they_are():
    chat = [[{"role": "assistant", "content": "2"}], [{"role": "assistant", "content": "4"}]]
    out = RewardSet([f"{M}:trl_contains_answer"], api="trl")(PROMPTS, chat, {"answer": [2, 5]})
    assert out.total == [1.0, 0.0]
    assert styles.CALLS[0]["completions"] == chat


def test_trl_function_without_kwargs_gets_only_what_it_names():
    out = RewardSet([f"{M}:trl_no_kwargs"])(PROMPTS, ["ab", "abc"], {"answer": ["2", "5"]})
    assert out.total == [2.0, 3.0] and styles.CALLS == [{"completions": ["ab", "abc"]}]


def test_trl_arguments_rlhf_cannot_give():
    with pytest.raises(ConfigError, match=r"'.*:trl_needs_trainer_state' requires `trainer_state`.*default"):
        RewardSet([f"{M}:trl_needs_trainer_state"])
    RewardSet([f"{M}:trl_optional_trainer_state"])(PROMPTS, ["a", "b"], {})
    assert styles.CALLS == [{"trainer_state": None}]


def test_trl_async_function_is_awaited():
    assert RewardSet([f"{M}:trl_async"])(PROMPTS, ["a", "b"], {}).total == [0.5, 0.5]


def test_verl_function_called_per_completion_with_mapped_arguments():
    columns = {"answer": ["2", "5"], "data_source": ["gsm8k", None], "level": [1, 2]}
    out = RewardSet([f"{M}:compute_score"])(PROMPTS, ["so 2", "so 6"], columns)
    assert out.total == [1.0, 0.0]
    assert styles.CALLS == [
        {"data_source": "gsm8k", "solution_str": "so 2", "ground_truth": "2",
         "extra_info": {"answer": "2", "level": 1}},
        {"data_source": "rlhf", "solution_str": "so 6", "ground_truth": "5",
         "extra_info": {"answer": "5", "level": 2}},
    ]


def test_verl_ground_truth_order_and_extra_info_column():
    assert verl_ground_truth({"ground_truth": "a", "reward_model": {"ground_truth": "b"}, "answer": "c"}) == "a"
    assert verl_ground_truth({"reward_model": {"ground_truth": "b"}, "answer": "c", "solution": "d"}) == "b"
    assert verl_ground_truth({"reward_model": {"style": "rule"}, "answer": "c", "solution": "d"}) == "c"
    assert verl_ground_truth({"answer": None, "solution": "d"}) == "d"
    assert verl_ground_truth({"level": 1}) is None
    # A veRL parquet row: reward_model carries the ground truth, its extra_info dict is passed on as extra_info.
    row = {"reward_model": [{"style": "rule", "ground_truth": "7"}], "extra_info": [{"split": "train", "index": 3}],
           "ability": ["math"]}
    RewardSet([f"{M}:compute_score"])(["p"], ["= 7"], row)
    assert styles.CALLS[0]["ground_truth"] == "7"
    assert styles.CALLS[0]["extra_info"] == {"ability": "math", "split": "train", "index": 3}


def test_verl_dict_result_and_scorers_without_data_source():
    assert RewardSet([f"{M}:compute_score_dict"])(PROMPTS, ["2", "x"], {"answer": ["2", "5"]}).total == [2.0, -1.0]
    assert RewardSet([f"{M}:gsm8k_style"])(PROMPTS, ["2", "x"], {"answer": ["2", "5"]}).total == [1.0, 0.0]


def test_verl_dict_without_score_is_a_contract_error_even_when_errors_are_scored():
    for on_error in ("raise", "score"):
        with pytest.raises(RewardError, match=r"'.*:compute_score_no_score_key' \(veRL style\) returned a dict "
                                              r"without 'score' for completion 0: keys \['reward'\]"):
            RewardSet([f"{M}:compute_score_no_score_key"], on_error=on_error)(["p"], ["c"], {"answer": ["1"]})


def test_per_sample_function_called_as_batch_is_named():
    with pytest.raises(RewardError, match=r"'.*:per_sample' returned a float, not a list.*reward.api=verl"):
        RewardSet([f"{M}:per_sample"])(["p"], ["c"], {})


def test_openrlhf_function_gets_queries_prompts_labels():
    out = RewardSet([f"{M}:reward_func"])(PROMPTS, [" 2", " 6"], {"answer": ["2", "5"], "label": ["x", "y"]})
    assert out.total == [1.0, 0.0]
    assert styles.CALLS == [{"queries": ["Q: 1+1?\nA: 2", "Q: 2+3?\nA: 6"], "prompts": PROMPTS,
                             "labels": ["2", "5"]}]
    RewardSet([f"{M}:reward_func"])(PROMPTS, ["x", "y"], {"label": ["x", "z"]})
    assert styles.CALLS[1]["labels"] == ["x", "z"]  # no `answer` column: the `label` column


def test_openrlhf_dict_and_list_results():
    assert RewardSet([f"{M}:reward_func_dict"])(PROMPTS, ["ab", "abc"], {}).total == [2.0, 3.0]
    assert RewardSet([f"{M}:reward_func_list"])(PROMPTS, ["a", "b"], {}).total == [0.25, 0.25]
    with pytest.raises(RewardError, match=r"\(OpenRLHF style\) returned a dict without 'rewards': keys \['scores'\]"):
        RewardSet([f"{M}:reward_func_no_rewards_key"])(PROMPTS, ["a", "b"], {})


def test_wrong_lengths_are_still_caught_after_adaptation():
    with pytest.raises(RewardError, match=r"'.*:reward_func_short' returned 1 values for 2 completions"):
        RewardSet([f"{M}:reward_func_short"])(PROMPTS, ["a", "b"], {})


def test_explicit_api_overrides_detection():
    RewardSet([f"{M}:anything"], api="verl")(["p"], ["c"], {"answer": ["1"]})
    assert styles.CALLS[-1] == {"args": (), "kwargs": {"data_source": "rlhf", "solution_str": "c",
                                                       "ground_truth": "1", "extra_info": {"answer": "1"}}}
    RewardSet([f"{M}:anything"], api="openrlhf")(["p"], ["c"], {"answer": ["1"]})
    assert styles.CALLS[-1] == {"args": (["pc"], ["p"], ["1"]), "kwargs": {}}
    RewardSet([f"{M}:anything"])(["p"], ["c"], {"answer": ["1"]})
    assert styles.CALLS[-1] == {"args": (), "kwargs": {"prompts": ["p"], "completions": ["c"], "answer": ["1"]}}
    # A veRL-shaped function forced to TRL's call fails, named.
    with pytest.raises(RewardError, match=r"'.*:compute_score' raised TypeError"):
        RewardSet([f"{M}:compute_score"], api="trl")(["p"], ["c"], {})


def test_builtins_are_not_adapted():
    out = RewardSet(["format", f"{M}:compute_score"], api="verl")(["p"], ["<think>a</think><answer>2</answer>"],
                                                                  {"answer": ["2"]})
    assert out.per_function["format"] == [1.0]


def test_config_key_and_unknown_value():
    assert load_config("grpo", []).reward.api == "auto"
    cfg = load_config("grpo", ["reward.api=verl"])
    assert cfg.reward.api == "verl"
    with pytest.raises(ConfigError, match=r"reward.api must be one of auto, trl, verl, openrlhf; got 'veRL'"):
        RewardSet(["accuracy"], api="veRL")


def test_length_reward_is_kimi_relative_within_each_prompt():
    completions = ["<answer>2</answer>", "<answer>2</answer> because", "<answer>3</answer> and so on and on",
                   "x", "x"]
    prompts = ["a", "a", "a", "b", "b"]
    out = length_reward(prompts, completions, answer=["2", "2", "2", "9", "9"])
    shortest, middle, longest = map(len, completions[:3])
    # Group a: lam = 0.5, 0.5 - (middle - shortest) / (longest - shortest), -0.5; the third is wrong: min(0, lam).
    assert out[:3] == pytest.approx([0.5, 0.5 - (middle - shortest) / (longest - shortest), -0.5])
    assert out[3:] == [0.0, 0.0]  # equally long
    # Without an answer column nothing is known correct: only the longer ones lose.
    assert length_reward(["a", "a", "a"], ["xx", "xxxx", "xxxxxx"]) == pytest.approx([0.0, 0.0, -0.5])
    # Wrong short answers gain nothing; through RewardSet by name.
    out = RewardSet(["length"])(["a", "a"], ["<answer>1</answer>", "<answer>2</answer> long"], {"answer": ["2", "2"]})
    assert out.total == pytest.approx([0.0, -0.5])
