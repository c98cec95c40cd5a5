"""Seeded sampling draws from softmax(logits / T) and what a row samples depends on its seed alone."""

import torch

from rlhf.rollout.generation import SamplingParams, SeededSampling, _processors, generate, sample_seeds
from tests.unit.rollout.test_experience import tiny


def test_the_draws_follow_the_softmax():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, float("-inf")])
    rows = 40000
    noisy = SeededSampling(range(rows))(torch.zeros(rows, 3, dtype=torch.long), logits.expand(rows, -1))
    freq = torch.bincount(noisy.argmax(-1), minlength=5).float() / rows
    torch.testing.assert_close(freq, logits.softmax(-1), atol=0.01, rtol=0)  # 4 standard errors at most
    assert freq[4] == 0  # a filtered token is never drawn


def test_steps_and_seeds_give_different_noise_and_the_same_seed_the_same():
    scores = torch.zeros(2, 50)
    a = SeededSampling([7, 8])
    first = a(torch.zeros(2, 4, dtype=torch.long), scores)
    second = a(torch.zeros(2, 5, dtype=torch.long), scores)
    assert not torch.equal(first[0], first[1]) and not torch.equal(first, second)
    again = SeededSampling([7])(torch.zeros(1, 9, dtype=torch.long), scores[:1])  # another prompt width, step 0
    assert torch.equal(again[0], first[0])


def test_temperature_and_top_k_apply_before_the_draw():
    logits = torch.tensor([[3.0, 2.9, -5.0, -5.0]]).expand(2000, -1)
    ids = torch.zeros(2000, 1, dtype=torch.long)
    top1 = _processors(SamplingParams(temperature=1.0, top_k=1), range(2000))(ids, logits).argmax(-1)
    assert (top1 == 0).all()
    cold = _processors(SamplingParams(temperature=0.01), range(2000))(ids, logits).argmax(-1)
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
