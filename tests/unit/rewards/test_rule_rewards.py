import pytest

from rlhf.errors import ConfigError, RewardError
from rlhf.rewards import REWARD_FUNCS, accuracy_reward, answers_match, extract_answer, format_reward, parse_number

R1 = "<think>7+8=15,4+3+1=8</think><answer>85</answer>"


@pytest.mark.parametrize(
    "text, expected",
    [
        (R1, "85"),
        ("<answer> 85 </answer>", "85"),
        ("<answer>\n85\n</answer>", "85"),
        ("<answer>1</answer> then <answer>2</answer>", "2"),  # duplicated: the last one counts
        ("<answer><answer>5</answer></answer>", "5"),  # nested: the innermost pair
        ("<answer>5", None),  # never closed
        ("5</answer>", None),
        ("<think>85</think>", None),
        ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
        ("#### 1,000\n", "1,000"),
        ("#### 3 \n#### 4", "4"),
        ("#### 72 dollars", "72"),
        ("#### 72, so", "72"),
        ("#### -$5.50.", "-$5.50"),
        ("#### 3/4", "3/4"),
        ("#### Paris", "Paris"),
        ("so the answer is \\boxed{42}.", "42"),
        ("\\boxed{1} or rather \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
        ("\\boxed {7}", "7"),
        ("\\boxed{unclosed", None),
        ("<answer>\\boxed{12}</answer>", "12"),
        ("<answer>9</answer> #### 3 \\boxed{4}", "9"),  # tags win over the other markers
        ("#### 5 and \\boxed{6}", "5"),
        ("plain text 85", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "s, expected",
    [
        ("85", 85.0),
        (" 85 ", 85.0),
        ("1,000", 1000.0),
        ("1,234,567.5", 1234567.5),
        ("$1,000", 1000.0),
        ("-$5", -5.0),
        ("$5$", 5.0),
        ("5.", 5.0),
        ("5.0", 5.0),
        ("-3", -3.0),
        ("\u22123", -3.0),
        ("+2", 2.0),
        (".5", 0.5),
        ("3/4", 0.75),
        ("-3/4", -0.75),
        ("\\frac{3}{4}", 0.75),
        ("\\dfrac{1}{2}", 0.5),
        ("50%", 50.0),
        ("1e3", 1000.0),
        (7, 7.0),
        ("1/0", None),
        ("1,00", None),  # not a thousands grouping
        ("12,34,567", None),
        ("abc", None),
        ("", None),
        ("nan", None),
        ("inf", None),
        ("5 apples", None),
        (True, None),
        (None, None),
    ],
)
def test_parse_number(s, expected):
    assert parse_number(s) == expected


@pytest.mark.parametrize(
    "predicted, reference, match",
    [
        ("1,000", "1000", True),
        ("5.0", "5", True),
        ("0.75", "3/4", True),
        ("$18", "18", True),
        ("-7", "-7", True),
        ("7", "-7", False),
        ("123456789", "123456790", False),  # exact, not within a relative tolerance
        ("0.3333", "1/3", False),
        ("Paris", "  paris. ", True),
        ("New  York", "new york", True),
        ("Paris", "Lyon", False),
        ("five", "5", False),
    ],
)
def test_answers_match(predicted, reference, match):
    assert answers_match(predicted, reference) is match


@pytest.mark.parametrize(
    "completion, answer, reward",
    [
        (R1, "85", 1.0),
        (R1, "86", 0.0),
        (R1, 85, 1.0),  # numeric answer column
        (R1, "Natalia ... 40 + 45 = 85\n#### 85", 1.0),  # gsm8k solution as the answer
        (R1, "\\boxed{85}", 1.0),
        ("<think>x</think><answer>1,000</answer>", "1000", 1.0),
        ("<think>x</think><answer>$1000.</answer>", "1,000", 1.0),
        ("<think>x</think><answer> -12 </answer>", "-12", 1.0),
        ("<think>x</think><answer>12</answer>", "-12", 0.0),
        ("<think>x</think><answer>3/4</answer>", "0.75", 1.0),
        ("The total is 72.\n#### 72", "72", 1.0),
        ("so \\boxed{72}", "72", 1.0),
        ("85", "85", 0.0),  # no final-answer marker at all
        ("<think>85</think><answer>", "85", 0.0),
        ([{"role": "assistant", "content": R1}], "85", 1.0),  # chat completion
        ([{"role": "assistant", "content": R1}], "84", 0.0),
        (R1, None, None),
        (R1, "", None),
    ],
)
def test_accuracy_reward(completion, answer, reward):
    assert accuracy_reward(["47+38="], [completion], answer=[answer]) == [reward]


def test_accuracy_reward_ignores_extra_columns_and_scores_a_batch():
    completions = [R1, "<answer>3</answer>", [{"role": "assistant", "content": "#### 4"}]]
    extra = {"solution": ["x"] * 3, "completion_ids": [[1]] * 3}
    rewards = accuracy_reward(["a", "b", "c"], completions, answer=["85", "4", "4"], **extra)
    assert rewards == [1.0, 0.0, 1.0]


def test_accuracy_reward_without_an_answer_column_names_the_columns_it_got():
    with pytest.raises(RewardError, match="`answer` column.*solution"):
        accuracy_reward(["p"], [R1], solution=["85"])
    with pytest.raises(RewardError, match="1 completions but 2"):
        accuracy_reward(["p"], [R1], answer=["85", "1"])
    with pytest.raises(RewardError, match="completion 0 is a int"):
        accuracy_reward(["p"], [85], answer=["85"])


@pytest.mark.parametrize(
    "prompt, completion, reward",
    [
        ("1+1=", "<think>a</think><answer>2</answer>", 1.0),
        ("1+1=", "  <think>\nsteps\n</think>\n\n<answer> 2 </answer>\n", 1.0),
        ("1+1=", "<think></think><answer>2</answer>", 1.0),
        ("1+1=", "<answer>2</answer>", 0.0),  # no think
        ("1+1=", "<think>a</think>", 0.0),  # no answer
        ("1+1=", "<think>a</think><answer>2", 0.0),  # unclosed answer
        ("1+1=", "<think>a<answer>2</answer>", 0.0),  # unclosed think
        ("1+1=", "<answer>2</answer><think>a</think>", 0.0),  # wrong order
        ("1+1=", "Sure! <think>a</think><answer>2</answer>", 0.0),  # text before
        ("1+1=", "<think>a</think><answer>2</answer> done", 0.0),  # text after
        ("1+1=", "<think>a</think> so <answer>2</answer>", 0.0),  # text between
        ("1+1=", "<think>a</think><answer>1</answer><answer>2</answer>", 0.0),  # duplicated answer
        ("1+1=", "<think><think>a</think></think><answer>2</answer>", 0.0),  # nested think
        ("1+1=", "<think>a</think><think>b</think><answer>2</answer>", 0.0),  # two thinks
        ("1+1=", "a</think><answer>2</answer>", 0.0),  # starts inside think, but the prompt did not open it
        ("1+1= <think>", "a</think><answer>2</answer>", 1.0),  # the prompt opened the think block
        ("1+1= <think>\n", "\nsteps\n</think>\n<answer>2</answer>", 1.0),
        ("1+1= <think>", "<think>a</think><answer>2</answer>", 0.0),  # a second <think> inside
        ("1+1= <think>", "a<answer>2</answer>", 0.0),
        ([{"role": "user", "content": "1+1= <think>"}], "a</think><answer>2</answer>", 1.0),
        ([{"role": "user", "content": "1+1="}], [{"role": "assistant", "content": R1}], 1.0),
        ([{"role": "user", "content": "1+1="}], [{"role": "assistant", "content": "2"}], 0.0),
    ],
)
def test_format_reward(prompt, completion, reward):
    assert format_reward([prompt], [completion]) == [reward]


def test_format_reward_without_prompts_and_with_mismatched_lengths():
    assert format_reward(None, [R1, "x"]) == [1.0, 0.0]
    with pytest.raises(RewardError, match="2 completions but 1 prompts"):
        format_reward(["p"], [R1, R1])


def test_registry_holds_the_rule_rewards_by_name():
    assert REWARD_FUNCS.get("accuracy") is accuracy_reward
    assert REWARD_FUNCS.get("format") is format_reward
    with pytest.raises(ConfigError, match="accuracy"):
        REWARD_FUNCS.get("acuracy")
