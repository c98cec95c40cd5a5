import pytest

from rlhf.config import load_config
from rlhf.errors import ConfigError


def test_train_rm_and_eval_compose():
    cfg = load_config("train_rm", [])
    assert cfg.stage == "train_rm" and cfg.data.arithmetic.num_train >= 1000
    assert cfg.algo.loss == "pairwise" and cfg.algo.score is None and cfg.algo.on_invalid == "drop"
    cfg = load_config("train_rm", ["algo.score=sum", "algo.loss=listwise", "data=hh_rlhf"])
    assert cfg.algo.score == "sum" and cfg.data.format == "hh_rlhf"
    assert load_config("eval", ["model.name_or_path=some/dir"]).stage == "eval"


def test_train_rm_typo_names_the_closest_key():
    with pytest.raises(ConfigError, match="Did you mean algo.score"):
        load_config("train_rm", ["algo.scor=sum"])
