"""The held-out evaluation's separation metric: how well a learned reward ranks a policy's right answers."""

import pytest

from rlhf.trainers.held_out import separation


def test_separation_scores_learned_rewards_on_rows_with_an_answer():
    correct = [1.0, 0.0, 1.0, 0.0, None]  # the last row has no answer: not counted
    scores = {"accuracy": correct, "format": [1.0, 1.0, 0.0, 1.0, 1.0], "model": [0.9, 0.1, 0.2, 0.5, 9.0],
              "mine": [1.0, 2.0, None, 0.0, 0.0]}
    out = separation(correct, scores)
    assert set(out) == {"eval/auc/model", "eval/auc/mine"}  # the built-in rules are not rated
    # model: right {0.9, 0.2} against wrong {0.1, 0.5}: 3 of 4 pairs ordered right
    assert out["eval/auc/model"] == pytest.approx(0.75)
    # mine leaves row 2 unscored: right {1.0} against wrong {2.0, 0.0}
    assert out["eval/auc/mine"] == pytest.approx(0.5)


def test_separation_needs_both_right_and_wrong_answers():
    assert separation([1.0, 1.0], {"model": [0.3, 0.1]}) == {}
    assert separation([1.0, 0.0], {"accuracy": [1.0, 0.0]}) == {}
