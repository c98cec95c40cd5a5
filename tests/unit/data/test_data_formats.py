import pytest
from datasets import Dataset

from rlhf.data.formats import drop_invalid_preferences, infer_format, split_shared_prompt, to_canonical
from rlhf.errors import DataError

GSM8K = {
    "question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
    "answer": "48/2 = 24\n48+24 = 72\n#### 72",
}
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]
HH_CHOSEN = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: It is 4."
HH_REJECTED = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: It is 5."


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_prompt_completion_rows_pass_through_with_extra_columns():
    ds = to_canonical([{"prompt": "1+1=", "completion": "2", "id": 7}], "auto", "sft")
    assert ds.to_list() == [{"prompt": "1+1=", "completion": "2", "id": 7}]


def test_messages_become_a_prompt_list_and_the_last_assistant_reply():
    ds = to_canonical([{"messages": CHAT}], "auto", "sft", source="chat.jsonl")
    assert ds.to_list() == [{"prompt": CHAT[:2], "completion": "4"}]


def test_messages_as_rl_prompts_drop_the_final_assistant_turn():
    ds = to_canonical([{"messages": CHAT}, {"messages": CHAT[:2]}], "auto", "prompt")
    assert ds["prompt"] == [CHAT[:2], CHAT[:2]]


def test_chat_completions_become_their_reply_text():
    rows = [{"prompt": [user("2+2?")], "completion": [assistant("4")]}]
    assert to_canonical(rows, "prompt_completion", "sft")[0] == {"prompt": [user("2+2?")], "completion": "4"}
    two_turns = [{"prompt": "2+2?", "completion": [assistant("4"), user("sure?")]}]
    with pytest.raises(DataError, match="'completion' at row 0 holds messages \\(assistant, user\\) after the prompt"):
        to_canonical(two_turns, "prompt_completion", "sft")


def test_gsm8k_rows_for_sft_and_for_rl():
    sft = to_canonical([GSM8K], "auto", "sft")[0]
    assert sft == {"prompt": GSM8K["question"], "completion": GSM8K["answer"], "answer": "72"}
    rl = to_canonical([GSM8K], "gsm8k", "prompt")[0]
    assert rl == {"prompt": GSM8K["question"], "answer": "72", "solution": GSM8K["answer"]}


def test_prompt_rows_keep_every_other_column_and_answers_become_text():
    ds = to_canonical([{"prompt": "1+1=", "answer": 2, "level": "easy"}], "auto", "prompt")
    assert ds.to_list() == [{"prompt": "1+1=", "answer": "2", "level": "easy"}]


def test_hh_rlhf_conversations_split_at_the_last_shared_assistant_turn():
    row = to_canonical([{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}], "auto", "preference")[0]
    assert row["prompt"] == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant:"
    assert row["chosen"] == " It is 4."
    assert row["rejected"] == " It is 5."


def test_hh_rlhf_rows_give_sft_the_chosen_reply_and_rl_the_prompt():
    rows = [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}]
    assert to_canonical(rows, "auto", "sft")[0]["completion"] == " It is 4."
    rl = to_canonical(rows, "auto", "prompt")
    assert rl.column_names == ["prompt"] and rl[0]["prompt"].endswith("\n\nAssistant:")


def test_hh_rlhf_without_a_shared_assistant_turn_names_the_row():
    rows = [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, {"chosen": "a", "rejected": "b"}]
    with pytest.raises(DataError, match=r"hh\.jsonl: row 1: .*no prefix ending in"):
        to_canonical(rows, "hh_rlhf", "preference", source="hh.jsonl")


def test_conversational_pairs_move_their_shared_turns_into_the_prompt():
    chosen = [user("2+2?"), assistant("4")]
    rejected = [user("2+2?"), assistant("5")]
    for row in ({"chosen": chosen, "rejected": rejected}, {"prompt": "2+2?", "chosen": chosen, "rejected": rejected}):
        out = to_canonical([row], "auto", "preference")[0]
        assert out == {"prompt": [user("2+2?")], "chosen": "4", "rejected": "5"}


def test_explicit_prompt_conversational_pairs_keep_their_prompt():
    row = {"prompt": [user("2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")], "margin": 2}
    out = to_canonical([row], "preference", "preference")[0]
    assert out == {"prompt": [user("2+2?")], "chosen": "4", "rejected": "5", "margin": 2.0}


def test_split_shared_prompt_on_message_lists():
    prompt, chosen, rejected = split_shared_prompt([user("q"), assistant("a")], [user("q"), assistant("b")])
    assert (prompt, chosen, rejected) == ([user("q")], [assistant("a")], [assistant("b")])


def test_ranked_rows_keep_their_responses_best_first():
    row = {"prompt": "p", "responses": ["best", "middle", "worst"]}
    assert to_canonical([row], "auto", "preference")[0] == row
    assert to_canonical([row], "auto", "sft")[0] == {"prompt": "p", "completion": "best"}
    with pytest.raises(DataError, match="'responses' has 1 item\\(s\\) at row 0"):
        to_canonical([{"prompt": "p", "responses": ["only"]}], "ranked", "preference")
    with pytest.raises(DataError, match=r"column 'responses\[1\]' is an int \(3\) at row 0"):
        to_canonical([{"prompt": "p", "responses": ["a", 3]}], "ranked", "preference")


def test_datasets_are_accepted_as_well_as_row_lists():
    ds = Dataset.from_list([GSM8K, GSM8K])
    assert to_canonical(ds, "auto", "prompt")["answer"] == ["72", "72"]


def test_column_mapping_renames_to_canonical_names():
    rows = [{"instruction": "1+1=", "output": "2", "prompt": "unused"}]
    ds = to_canonical(rows, "auto", "sft", columns={"prompt": "instruction", "completion": "output"})
    assert ds.to_list() == [{"prompt": "1+1=", "completion": "2"}]
    swap = {"prompt": "completion", "completion": "prompt"}
    swapped = to_canonical([{"prompt": "b", "completion": "a"}], "auto", "sft", columns=swap)
    assert swapped[0] == {"prompt": "a", "completion": "b"}


def test_column_mapping_errors_name_the_missing_column_and_the_bad_key():
    with pytest.raises(DataError, match=r"d\.csv: data\.columns maps 'prompt' to column 'question'.*: text, label"):
        to_canonical([{"text": "x", "label": "y"}], "auto", "sft", columns={"prompt": "question"}, source="d.csv")
    with pytest.raises(DataError, match="unknown key 'promt'"):
        to_canonical([{"text": "x"}], "auto", "sft", columns={"promt": "text"})


def test_auto_names_the_missing_columns_the_present_ones_and_what_was_expected():
    with pytest.raises(DataError) as err:
        to_canonical([{"prompt": "x", "text": "y"}], "auto", "sft", source="train.jsonl")
    message = str(err.value)
    for part in ("train.jsonl", "missing column(s) completion", "present: prompt, text", "expected prompt+completion"):
        assert part in message
    with pytest.raises(DataError, match="missing column\\(s\\) rejected.*present: prompt, chosen"):
        infer_format(["prompt", "chosen"], "preference", "pairs.jsonl")


def test_explicit_formats_are_validated():
    with pytest.raises(DataError, match=r"p\.jsonl: missing column\(s\) completion for data\.format=prompt_completion"):
        to_canonical([{"prompt": "x"}], "prompt_completion", "sft", source="p.jsonl")
    with pytest.raises(DataError, match="data.format=gsm8k cannot provide preference data"):
        to_canonical([GSM8K], "gsm8k", "preference")
    with pytest.raises(DataError, match="unknown data.format='alpaca'"):
        to_canonical([GSM8K], "alpaca", "sft")


def test_wrong_types_name_the_column_and_the_row():
    rows = [{"prompt": "p", "completion": "c"}] * 7 + [{"prompt": "p", "completion": 7}]
    with pytest.raises(DataError, match=r"x\.jsonl: column 'completion' is an int \(7\) at row 7"):
        to_canonical(rows, "auto", "sft", source="x.jsonl")
    with pytest.raises(DataError, match="column 'prompt' is missing \\(null\\) at row 1"):
        to_canonical([{"prompt": "p"}, {"other": 1}], "auto", "prompt")
    with pytest.raises(DataError, match="'messages' is a list that is not chat messages.* at row 0"):
        to_canonical([{"messages": [{"role": "user"}]}], "messages", "sft")
    with pytest.raises(DataError, match="row 0: `messages` has no assistant message"):
        to_canonical([{"messages": [user("hi")]}], "messages", "sft")
    with pytest.raises(DataError, match="column 'margin' is a str \\('big'\\) at row 0"):
        to_canonical([{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}], "auto", "preference")


def test_a_column_with_two_types_is_named():
    rows = [{"prompt": "p", "meta": "x"}, {"prompt": "p", "meta": [1]}]
    with pytest.raises(DataError, match="column 'meta' holds a list at row 1 but a string at row 0"):
        to_canonical(rows, "auto", "prompt")


def test_no_rows_is_an_error():
    with pytest.raises(DataError, match="empty.jsonl: no rows"):
        to_canonical([], "auto", "sft", source="empty.jsonl")


def test_invalid_preference_pairs_are_dropped_and_counted():
    ds = Dataset.from_list(
        [
            {"prompt": "p", "chosen": "a", "rejected": "b"},
            {"prompt": "p", "chosen": "same", "rejected": " same "},
            {"prompt": "p", "chosen": "a", "rejected": "  "},
            {"prompt": "p", "chosen": "c", "rejected": "d"},
        ]
    )
    kept, dropped = drop_invalid_preferences(ds)
    assert dropped == 2 and kept["chosen"] == ["a", "c"]
    with pytest.raises(DataError, match="pairs.jsonl: preference row 1: chosen and rejected are identical"):
        drop_invalid_preferences(ds, "error", source="pairs.jsonl")
    with pytest.raises(DataError, match="all 1 preference rows are invalid"):
        drop_invalid_preferences(ds.select([2]))
    clean, n = drop_invalid_preferences(ds.select([0, 3]), "error")
    assert n == 0 and len(clean) == 2


def test_invalid_ranked_and_conversational_rows():
    ranked = Dataset.from_list([{"prompt": "p", "responses": ["a", "b", "a"]}, {"prompt": "q", "responses": ["c"]}])
    with pytest.raises(DataError, match="row 0: responses 0 and 2 are identical"):
        drop_invalid_preferences(ranked, "error")
    with pytest.raises(DataError, match="all 2 preference rows are invalid \\(first: row 0: responses 0 and 2"):
        drop_invalid_preferences(ranked)
    chat = Dataset.from_list(
        [
            {"prompt": [user("q")], "chosen": [assistant("a")], "rejected": [assistant("")]},
            {"prompt": [user("q")], "chosen": [assistant("a")], "rejected": [assistant("b")]},
        ]
    )
    kept, dropped = drop_invalid_preferences(chat)
    assert dropped == 1 and kept[0]["rejected"] == [assistant("b")]


def test_multi_turn_pairs_that_diverge_early_are_rejected_with_the_row():
    chosen = [user("q"), assistant("a"), user("more"), assistant("b")]
    rejected = [user("q"), assistant("x"), user("more"), assistant("y")]
    with pytest.raises(DataError, match="'chosen' at row 0 holds messages \\(assistant, user, assistant\\)"):
        to_canonical([{"chosen": chosen, "rejected": rejected}], "hh_rlhf", "preference")
