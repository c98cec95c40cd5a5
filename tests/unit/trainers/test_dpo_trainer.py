"""The DPO trainer's pairs and losses in process: a policy equal to its reference scores log 2 per pair, and simpo
needs no reference and reads the response lengths."""

import copy
import math

import pytest
import torch
from omegaconf import OmegaConf

from rlhf.algos.dpo import simpo_loss
from rlhf.config import DPOConfig, TinyModelConfig
from rlhf.models.tiny import build_tiny_model
from rlhf.models.tokenizer import build_char_tokenizer
from rlhf.rewards.model import Preference
from rlhf.trainers.dpo import DPOTrainer, pair_experience, pairs_of, sequence_logprobs

TOK = build_char_tokenizer()
EOS = TOK.eos_token_id


def trainer(loss_type):
    cfg = OmegaConf.structured(DPOConfig)
    cfg.algo.loss_type = loss_type
    t = DPOTrainer(cfg)
    model = build_tiny_model(TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), TOK, 0)
    t.tokenizer, t.shared_prefix = TOK, True
    t.engine = type("Engine", (), {"device": torch.device("cpu")})()
    t.reference = copy.deepcopy(model).eval() if loss_type != "simpo" else None
    return t, model.eval()


PAIRS = pairs_of([Preference([10, 11], [[20, 21, EOS], [22, EOS]]),
                  Preference([12], [[23, EOS], [24, 25, 26, EOS], [27, EOS]])])  # a ranked list: two pairs


def test_a_ranked_list_gives_its_best_against_each_other_response():
    assert [(p.chosen_ids, p.rejected_ids) for p in PAIRS] == [
        ([20, 21, EOS], [22, EOS]), ([23, EOS], [24, 25, 26, EOS]), ([23, EOS], [27, EOS])]


def test_a_policy_equal_to_its_reference_scores_log_two():
    t, model = trainer("sigmoid")
    loss, sums = t.losses(PAIRS, model, grad=False)
    torch.testing.assert_close(loss, torch.full((3,), math.log(2.0)))
    assert sums["pairs"] == 3 and sums["chosen"] == pytest.approx(0.0, abs=1e-6) and sums["correct"] == 0


def test_simpo_needs_no_reference_and_reads_the_lengths():
    t, model = trainer("simpo")
    loss, _ = t.losses(PAIRS, model, grad=True)
    exp = pair_experience(PAIRS, TOK.pad_token_id, EOS)
    logps = sequence_logprobs(model, exp, shared_prefix=False)
    lengths = exp.action_mask.sum(-1)
    expected = simpo_loss(logps[0::2], logps[1::2], lengths[0::2], lengths[1::2], beta=0.1, gamma_beta_ratio=0.5)
    torch.testing.assert_close(loss, expected)
    assert loss.requires_grad


def test_a_precomputed_reference_gives_the_live_losses_and_frees_the_model(tmp_path):
    t, model = trainer("sigmoid")
    torch.manual_seed(0)
    with torch.no_grad():  # a policy away from its reference, so the reference's log-probs count
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pairs = copy.deepcopy(PAIRS)
    live, _ = t.losses(pairs, model, grad=False)
    assert not torch.allclose(live, torch.full_like(live, math.log(2.0)))
    t.train, t.eval_pairs, t.run_dir = pairs, [], tmp_path
    t.cache_reference()
    assert t.reference is None and (tmp_path / "reference_logps.pt").is_file()
    cached, _ = t.losses(pairs, model, grad=False)
    torch.testing.assert_close(cached, live)
    resumed = copy.deepcopy(PAIRS)  # a resumed run reads the file: no reference is there to compute with
    t.train = resumed
    t.cache_reference()
    assert [p.reference for p in resumed] == [p.reference for p in pairs]
