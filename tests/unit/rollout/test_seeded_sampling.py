"""Seeded sampling draws from softmax(logits / T) and what a row samples depends on its seed alone."""

import torch

from rlhf.rollout.generation import SamplingParams, SeededSampling, _processors, generate, sample_seeds
from tests.unit.rollout.test_experience import tiny


def draws(sampler, scores, width=3):
    return sampler(torch.zeros(scores.shape[0], width, dtype=torch.long), scores).argmax(-1)


def test_the_draws_follow_the_softmax():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, float("-inf"), 0.5])
    rows = 40000
    freq = torch.bincount(draws(SeededSampling(range(rows)), logits.expand(rows, -1)), minlength=6).float() / rows
    torch.testing.assert_close(freq, logits.softmax(-1), atol=0.01, rtol=0)  # 4 standard errors at most
    assert freq[4] == 0  # a filtered token is never drawn, not even when a neighbour has its cumulative mass


def test_a_vocabulary_of_one_token_and_tiny_probabilities():
    assert draws(SeededSampling(range(5)), torch.zeros(5, 1)).tolist() == [0] * 5
    logits = torch.full((2000, 50000), -30.0)
    logits[:, 123] = 0.0  # every other token has probability about 1e-13 each
    assert (draws(SeededSampling(range(2000)), logits) == 123).all()


def test_steps_and_seeds_give_different_draws_and_the_same_seed_the_same():
    scores = torch.zeros(2, 1000)
    a = SeededSampling([7, 8])
    steps = torch.stack([draws(a, scores, width) for width in range(4, 24)])  # 20 decode steps of two rows
    assert (steps[:, 0] != steps[:, 1]).sum() > 15 and len(set(steps[:, 0].tolist())) > 15
    again = SeededSampling([7])  # another prompt width: the same draws step by step
    assert torch.equal(torch.stack([draws(again, scores[:1], width)[0] for width in range(9, 29)]), steps[:, 0])


def test_temperature_and_top_k_apply_before_the_draw():
    logits = torch.tensor([[3.0, 2.9, -5.0, -5.0]]).expand(2000, -1)
    ids = torch.zeros(2000, 1, dtype=torch.long)
    top1 = _processors(SamplingParams(1, temperature=1.0, top_k=1), range(2000))(ids, logits).argmax(-1)
    assert (top1 == 0).all()
    cold = _processors(SamplingParams(1, temperature=0.01), range(2000))(ids, logits).argmax(-1)
    assert (cold == 0).float().mean() > 0.99  # 0.1 apart at T=0.01 is a 10-logit gap


def test_what_a_row_samples_does_not_depend_on_its_batch():
    tok, model = tiny()
    prompts = [tok(p)["input_ids"] for p in ("12+3=", "7+8=", "100+250=", "1+1=", "45+67=")]
    params = SamplingParams(max_new_tokens=10, temperature=1.0)
    seeds = sample_seeds(0, range(5), 1)
    together = generate(model, prompts, tok.pad_token_id, tok.eos_token_id, params, 8, seeds=seeds)
    apart = generate(model, prompts, tok.pad_token_id, tok.eos_token_id, params, 2, seeds=seeds)
    back = generate(model, prompts[::-1], tok.pad_token_id, tok.eos_token_id, params, 3, seeds=seeds[::-1])
    assert together == apart == back[::-1]
    other = generate(model, prompts, tok.pad_token_id, tok.eos_token_id, params, 8, seeds=sample_seeds(1, range(5), 1))
    assert other != together


def test_sample_seeds_are_distinct_per_position_and_response():
    seeds = sample_seeds(3, range(100, 140), 8)
    assert len(set(seeds)) == len(seeds) == 320
    assert sample_seeds(3, [120], 8) == seeds[20 * 8:21 * 8]
