import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf.config import ArithmeticConfig
from rlhf.data.tasks.arithmetic import (
    arithmetic_demonstrations,
    arithmetic_preferences,
    arithmetic_problems,
    has_carry,
    in_test_split,
    solution,
)
from rlhf.errors import ConfigError, DataError
from rlhf.rewards.rules import accuracy_reward, format_reward

PROMPT = re.compile(r"(\d+)\+(\d+)=")


def operands(row):
    a, b = PROMPT.fullmatch(row["prompt"]).groups()
    return a, b


def pairs(rows):
    return [operands(r) for r in rows]


def scores(prompts, completions, answers):
    return accuracy_reward(prompts, completions, answer=answers), format_reward(prompts, completions)


def test_solution_writes_columns_from_the_least_significant_digit():
    assert solution(47, 38) == "<think>7+8=15,4+3+1=8</think><answer>85</answer>"
    assert solution(57, 68) == "<think>7+8=15,5+6+1=12</think><answer>125</answer>"
    assert solution(12, 34) == "<think>2+4=6,1+3=4</think><answer>46</answer>"
    assert solution(999, 1) == "<think>9+1=10,9+0+1=10,9+0+1=10</think><answer>1000</answer>"


def test_drop_carries_forgets_every_carry():
    assert solution(47, 38, drop_carries=True) == "<think>7+8=15,4+3=7</think><answer>75</answer>"
    assert solution(57, 68, drop_carries=True) == "<think>7+8=15,5+6=11</think><answer>115</answer>"
    # Without a carry between columns the flawed teacher is right: the top column is written in full.
    assert solution(50, 60, drop_carries=True) == solution(50, 60) == "<think>0+0=0,5+6=11</think><answer>110</answer>"


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10**6), st.integers(0, 10**6))
def test_solution_is_verified_and_carry_dropping_is_wrong_exactly_on_carry_problems(a, b):
    prompt = [f"{a}+{b}="]
    acc, fmt = scores(prompt, [solution(a, b)], [str(a + b)])
    assert acc == [1.0] and fmt == [1.0]
    xs, ys = str(a)[::-1], str(b)[::-1]
    width = max(len(xs), len(ys))
    column_sums = [int((xs + "0" * width)[i]) + int((ys + "0" * width)[i]) for i in range(width)]
    assert has_carry(a, b) == any(s >= 10 for s in column_sums[:-1])
    acc, fmt = scores(prompt, [solution(a, b, drop_carries=True)], [str(a + b)])
    assert fmt == [1.0]
    assert acc == [0.0 if has_carry(a, b) else 1.0]


@pytest.mark.parametrize("digits", [1, 2, 3, 6])
def test_operands_have_exactly_the_configured_digits(digits):
    cfg = ArithmeticConfig(digits=digits, num_train=20, num_eval=10)
    for split in ("train", "test"):
        for a, b in pairs(arithmetic_problems(cfg, split, seed=0)):
            assert len(a) == len(b) == digits
            assert digits == 1 or not a.startswith("0") and not b.startswith("0")


@pytest.mark.parametrize("digits", [2, 4])
def test_train_and_test_are_disjoint_duplicate_free_and_sized(digits):
    cfg = ArithmeticConfig(digits=digits, num_train=1000, num_eval=300)
    test = set(pairs(arithmetic_problems(cfg, "test", seed=0)))
    for seed in (0, 1, 2):
        train_rows = arithmetic_problems(cfg, "train", seed)
        train = pairs(train_rows)
        assert len(train) == len(set(train)) == 1000
        assert not set(train) & test
    assert len(test) == 300
    assert all(in_test_split(int(a), int(b)) for a, b in test)


def test_problems_are_deterministic_by_seed_and_answers_are_sums():
    cfg = ArithmeticConfig()
    rows = arithmetic_problems(cfg, "train", seed=3)
    assert rows == arithmetic_problems(cfg, "train", seed=3)
    assert rows != arithmetic_problems(cfg, "train", seed=4)
    assert all(r["answer"] == str(int(a) + int(b)) for r, (a, b) in zip(rows, pairs(rows)))


def test_test_split_does_not_depend_on_num_train():
    small, large = ArithmeticConfig(num_train=10), ArithmeticConfig(num_train=5000)
    assert arithmetic_problems(small, "test", 0) == arithmetic_problems(large, "test", 0)


def test_a_pool_too_small_for_the_asked_size_is_a_data_error():
    with pytest.raises(DataError, match="digits=1.*num_eval=50"):
        arithmetic_problems(ArithmeticConfig(digits=1, num_eval=50), "test", 0)
    with pytest.raises(DataError, match="num_train=5000"):
        arithmetic_problems(ArithmeticConfig(digits=1, num_train=5000), "train", 0)


def test_invalid_settings_are_config_errors():
    with pytest.raises(ConfigError, match="digits"):
        arithmetic_problems(ArithmeticConfig(digits=0), "train", 0)
    with pytest.raises(ConfigError, match="wrong_rate"):
        arithmetic_demonstrations(ArithmeticConfig(wrong_rate=1.5), "train", 0)


def test_train_demonstrations_drop_carries_on_the_configured_share_of_carry_problems():
    cfg = ArithmeticConfig(num_train=300, carry_drop_rate=0.5, wrong_rate=0.0)
    rows = arithmetic_demonstrations(cfg, "train", seed=0)
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in arithmetic_problems(cfg, "train", 0)]
    carry = [(r, a, b) for r in rows for a, b in [map(int, operands(r))] if has_carry(a, b)]
    dropped = [r for r, a, b in carry if r["completion"] == solution(a, b, drop_carries=True)]
    assert len(dropped) == round(0.5 * len(carry))
    acc, fmt = scores([r["prompt"] for r in rows], [r["completion"] for r in rows], [r["answer"] for r in rows])
    assert all(f == 1.0 for f in fmt)
    for r, score in zip(rows, acc):
        a, b = map(int, operands(r))
        expected_wrong = r in dropped
        assert score == (0.0 if expected_wrong else 1.0), r
        assert r["answer"] == str(a + b)


def test_wrong_rate_replaces_answers_and_test_demonstrations_are_always_correct():
    cfg = ArithmeticConfig(num_train=200, num_eval=100, carry_drop_rate=1.0, wrong_rate=0.1)
    rows = arithmetic_demonstrations(cfg, "train", seed=1)
    acc, fmt = scores([r["prompt"] for r in rows], [r["completion"] for r in rows], [r["answer"] for r in rows])
    n_carry = sum(has_carry(*map(int, operands(r))) for r in rows)
    assert acc.count(0.0) == n_carry + 20
    assert all(f == 1.0 for f in fmt)
    test = arithmetic_demonstrations(cfg, "test", seed=1)
    acc, _ = scores([r["prompt"] for r in test], [r["completion"] for r in test], [r["answer"] for r in test])
    assert len(test) == 100 and acc == [1.0] * 100
    assert rows == arithmetic_demonstrations(cfg, "train", seed=1)


@pytest.mark.parametrize("split", ["train", "test"])
def test_preferences_put_a_verified_answer_above_a_flawed_one(split):
    cfg = ArithmeticConfig(num_train=300, num_eval=200)
    rows = arithmetic_preferences(cfg, split, seed=0)
    prompts, answers = [r["prompt"] for r in rows], [r["answer"] for r in rows]
    chosen_acc, chosen_fmt = scores(prompts, [r["chosen"] for r in rows], answers)
    rejected_acc, rejected_fmt = scores(prompts, [r["rejected"] for r in rows], answers)
    assert chosen_acc == chosen_fmt == [1.0] * len(rows)
    assert all(acc == 0.0 or fmt == 0.0 for acc, fmt in zip(rejected_acc, rejected_fmt))
    assert all(r["chosen"] != r["rejected"] for r in rows)
    # The mix holds wrong-but-well-formatted and right-but-ill-formatted rejections, carry drops among them.
    assert sum(a == 0.0 and f == 1.0 for a, f in zip(rejected_acc, rejected_fmt)) > len(rows) / 4
    assert rejected_fmt.count(0.0) > len(rows) / 10  # 2 in 15 of the odds
    carry_drops = sum(
        r["rejected"] == solution(*map(int, operands(r)), drop_carries=True) != r["chosen"] for r in rows
    )
    assert carry_drops > len(rows) / 40  # 2 in 15 of the odds, on the problems that carry
    assert sum(miscopied(r) for r in rows) > len(rows) / 30  # 1 in 15 of the odds
    assert rows == arithmetic_preferences(cfg, split, seed=0)


def miscopied(row) -> bool:
    """Whether the rejection solves, right, a problem one operand digit away from the prompt's."""
    for which, operand in enumerate(operands(row)):
        for i, old in enumerate(operand):
            for new in "0123456789":
                if new == old or (new == "0" and i == 0 and len(operand) > 1):
                    continue
                a, b = operands(row)
                changed = operand[:i] + new + operand[i + 1:]
                a, b = (changed, b) if which == 0 else (a, changed)
                if row["rejected"] == solution(int(a), int(b)):
                    return True
    return False


def test_several_pairs_per_problem_reject_in_different_ways_on_train_only():
    cfg = ArithmeticConfig(num_train=50, num_eval=20, pairs_per_problem=3)
    rows = arithmetic_preferences(cfg, "train", seed=0)
    assert len(rows) == 150
    for i in range(0, 150, 3):
        group = rows[i:i + 3]
        assert len({r["prompt"] for r in group}) == 1 and len({r["rejected"] for r in group}) == 3
    assert len(arithmetic_preferences(cfg, "test", seed=0)) == 20
    one = arithmetic_preferences(ArithmeticConfig(num_train=50, num_eval=20), "train", seed=0)
    assert [r["prompt"] for r in one] == [r["prompt"] for r in rows[::3]]


def test_a_column_added_wrong_is_the_carry_column_where_one_is_carried_into():
    rows = arithmetic_preferences(ArithmeticConfig(num_train=600, num_eval=20), "train", seed=0)
    think = re.compile(r"<think>(.*)</think>")
    on_carry = on_plain = 0
    for row in rows:
        chosen = think.search(row["chosen"]).group(1).split(",")
        found = think.search(row["rejected"])
        rejected = found.group(1).split(",") if found else []
        if len(rejected) != len(chosen) or any(r.split("=")[0] != c.split("=")[0] for r, c in zip(rejected, chosen)):
            continue  # not a column summed wrong (carry dropped or added, miscopied, no think block)
        wrong = [c for r, c in zip(rejected, chosen) if r != c]
        if not wrong:
            continue  # the right work with a wrong or unclosed answer
        assert len(wrong) == 1
        if any(c.count("+") == 2 for c in chosen):
            assert wrong[0].count("+") == 2, row  # a carry reaches a column: that column is the wrong one
            on_carry += 1
        else:
            on_plain += 1
    # a column added wrong is 6 in 15 of the odds: on problems that carry, and on problems that do not
    assert on_carry > len(rows) / 10 and on_plain > len(rows) / 20
