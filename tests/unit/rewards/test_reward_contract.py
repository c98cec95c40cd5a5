import time

import pytest

from rlhf.errors import ConfigError, RewardError
from rlhf.rewards.combine import RewardSet


def one(prompts, completions, **kw):
    return [1.0] * len(completions)


def short(prompts, completions, **kw):
    return [1.0]


def maybe(prompts, completions, **kw):
    return [None if c.startswith("skip") else 0.5 for c in completions]


def never(prompts, completions, **kw):
    return [None] * len(completions)


def boom(prompts, completions, **kw):
    raise ValueError("bad sample")


def slow(prompts, completions, **kw):
    time.sleep(0.05)
    return [0.0] * len(completions)


def nan(prompts, completions, **kw):
    return [float("nan")] * len(completions)


M = "tests.unit.rewards.test_reward_contract"


def test_weighted_sum_of_registered_and_dotted_functions():
    rs = RewardSet(["format", f"{M}:one"], [0.5, 2.0])
    out = rs(["1+1="], ["<think>x</think><answer>2</answer>"], {"answer": ["2"]})
    assert out.total == [0.5 * 1.0 + 2.0 * 1.0]
    assert out.per_function["format"] == [1.0]


def test_wrong_length_names_the_function():
    with pytest.raises(RewardError, match=r"'.*:short' returned 1 values for 2 completions"):
        RewardSet([f"{M}:short"])(["a", "b"], ["x", "y"], {})


def test_none_is_left_out_and_all_none_scores_zero_and_is_counted():
    out = RewardSet([f"{M}:maybe", f"{M}:never"], [1.0, 1.0])(["a", "b"], ["skip me", "keep"], {})
    assert out.total == [0.0, 0.5]
    assert out.all_none == 1


def test_raising_function_names_function_and_sample_or_scores_default():
    with pytest.raises(RewardError, match=r"'.*:boom' raised ValueError: bad sample \(on 'oops'"):
        RewardSet([f"{M}:boom"])(["p"], ["oops"], {})
    rs = RewardSet([f"{M}:boom"], on_error="score", error_score=-1.0)
    assert rs(["p"], ["oops"], {}).total == [-1.0] and rs.errors == 1


def hangs(prompts, completions, **kw):
    time.sleep(30)


def test_slow_and_non_finite_functions_are_refused():
    with pytest.raises(RewardError, match="did not return within reward.time_limit_s=0.01s"):
        RewardSet([f"{M}:slow"], time_limit_s=0.01)(["p"], ["c"], {})
    began = time.monotonic()
    with pytest.raises(RewardError, match="did not return"):  # a hung function stops the run, not hangs it
        RewardSet([f"{M}:hangs"], time_limit_s=0.5)(["p"], ["c"], {})
    assert time.monotonic() - began < 5
    with pytest.raises(RewardError, match="expected a finite number"):
        RewardSet([f"{M}:nan"])(["p"], ["c"], {})


def test_bad_names_and_weights():
    with pytest.raises(ConfigError, match="unknown reward function 'acuracy'. Did you mean 'accuracy'"):
        RewardSet(["acuracy"])
    with pytest.raises(ConfigError, match="cannot be loaded"):
        RewardSet(["no_such_pkg.mod:f"])
    with pytest.raises(ConfigError, match="2 values for 1"):
        RewardSet(["accuracy"], [1.0, 2.0])


def test_the_set_knows_its_reward_model_and_scores_raw_rows_with_it_only():
    class Scorer:  # a learned reward model: scores the raw prompt rows, not the policy's rendered prompts
        def score_completions(self, rows, completions):
            return [float(len(r["prompt"])) for r in rows]

    def plain(prompts, completions, **columns):
        return [1.0] * len(completions)

    plain.score_completions = None  # a function with such an attribute is still called as a plain function
    scorer = Scorer()
    rs = RewardSet(["format", "model", "plain"], [0.2, 0.5, 1.0], functions={"model": scorer, "plain": plain})
    assert rs.model is scorer and rs.model_weight == 0.5
    out = rs(["rendered"], ["x"], {}, rows=[{"prompt": "abc"}])
    assert out.per_function["model"] == [3.0] and out.per_function["plain"] == [1.0]
    assert RewardSet(["format"]).model is None


def test_from_config_names_what_is_missing():
    from omegaconf import OmegaConf

    from rlhf.config import RewardConfig

    r = OmegaConf.structured(RewardConfig)
    r.funcs, r.weights = ["model"], [1.0]
    with pytest.raises(ConfigError, match="reward.model_path is not set"):
        RewardSet.from_config(r)
    r.funcs, r.weights, r.model_path = ["format"], [1.0], "/some/rm"
    with pytest.raises(ConfigError, match="does not name `model`"):
        RewardSet.from_config(r)
