import itertools
import random

import pytest
from omegaconf import OmegaConf

from rlhf.config import DataConfig
from rlhf.data.sampler import StepSampler
from rlhf.data.tokenize import Encoded, collate_lm, collate_prompts, encode_rows, length_buckets, render_prompt
from rlhf.errors import DataError
from rlhf.models.tokenizer import build_char_tokenizer


def test_sampler_covers_each_epoch_once_and_is_seeded():
    s = StepSampler(10, seed=3)
    first = s.indices(0, 10)
    assert sorted(first) == list(range(10))
    assert s.indices(0, 10) == first
    assert StepSampler(10, seed=4).indices(0, 10) != first
    assert sorted(s.indices(10, 10)) == list(range(10))


def test_sampler_position_in_samples_is_world_size_independent():
    s = StepSampler(37, seed=0)
    one = [i for step in range(5) for i in s.rank_indices(step * 8, 8, 0, 1)]
    two = [i for step in range(5) for r in range(2) for i in s.rank_indices(step * 8, 8, r, 2)]
    four = [i for step in range(5) for r in range(4) for i in s.rank_indices(step * 8, 8, r, 4)]
    assert one == two == four


def _data_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), kw)


def test_collate_lm_masks_only_completion_targets():
    batch = collate_lm([Encoded([5, 6, 7], [8, 9]), Encoded([5], [8, 9, 10])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 8, 9, 10, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # loss_mask[t] covers predicting input_ids[t+1]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]


def test_collate_prompts_left_pads():
    batch = collate_prompts([[1, 2, 3], [4]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_long_prompts_dropped_or_refused():
    tok = build_char_tokenizer()
    rows = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "x" * 50, "completion": "y"}]
    enc, kept, dropped = encode_rows(rows, tok, _data_cfg(max_prompt_length=10), "completion", "f.jsonl")
    assert kept == [0] and dropped == 1
    assert enc[0].response_ids[-1] == tok.eos_token_id
    with pytest.raises(DataError, match=r"f.jsonl: row 1: prompt is 50 tokens"):
        encode_rows(rows, tok, _data_cfg(max_prompt_length=10, on_long_prompt="error"), "completion", "f.jsonl")


def test_responses_truncated_to_max_length():
    tok = build_char_tokenizer()
    enc, _, _ = encode_rows([{"prompt": "ab", "completion": "c" * 20}], tok, _data_cfg(max_length=8), "completion", "x")
    assert len(enc[0].prompt_ids) + len(enc[0].response_ids) == 8


def test_prompt_template_and_chat_rendering():
    tok = build_char_tokenizer()
    text, chat = render_prompt({"prompt": "2+2", "answer": "4"}, tok, _data_cfg(prompt_template="Q: {prompt} A:"))
    assert (text, chat) == ("Q: 2+2 A:", False)
    messages = [{"role": "user", "content": "hi"}]
    text, chat = render_prompt({"prompt": messages}, tok, _data_cfg())
    assert chat and text == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    with pytest.raises(DataError, match="not a column"):
        render_prompt({"prompt": "x"}, tok, _data_cfg(prompt_template="{question}"))


def test_a_run_resumed_on_another_process_count_sees_every_row_once():
    """2 processes for 3 steps, then (resumed from samples_seen=24) 1 process, then 4: the rows seen are exactly
    those of one process throughout - none skipped, none repeated."""
    s, batch = StepSampler(37, seed=1), 8
    seen, positions = [], []
    for step, world in enumerate([2, 2, 2, 1, 1, 4, 4]):
        for rank in range(world):
            seen += s.rank_indices(step * batch, batch, rank, world)
            positions += list(s.rank_positions(step * batch, batch, rank, world))
    assert positions == list(range(7 * batch))
    assert seen == s.indices(0, 7 * batch)


def bucket_cost(groups, overhead):
    return sum(len(rows) * length + overhead for rows, length in groups)


def brute_force_cost(extents, max_buckets, overhead):
    """Every split of the rows sorted by extent into at most max_buckets runs."""
    order = sorted(extents, reverse=True)
    best = float("inf")
    for k in range(max_buckets):
        for cuts in itertools.combinations(range(1, len(order)), k):
            bounds = (0, *cuts, len(order))
            best = min(best, sum((j - i) * order[i] + overhead for i, j in zip(bounds, bounds[1:])))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_length_buckets_split_rows_at_least_padded_cost(seed):
    rng = random.Random(seed)
    extents = [rng.randint(1, 40) for _ in range(rng.randint(1, 9))]
    overhead, max_buckets = rng.choice([0, 5, 30]), rng.randint(1, 4)
    groups = length_buckets(extents, max_buckets, overhead)
    assert sorted(i for rows, _ in groups for i in rows) == list(range(len(extents)))  # every row once
    assert len(groups) <= max_buckets
    assert all(length == max(extents[i] for i in rows) for rows, length in groups)
    assert bucket_cost(groups, overhead) == brute_force_cost(extents, max_buckets, overhead)


def test_length_buckets_by_hand():
    # 4 rows of 60 and 4 of 20: one group pads 8 x 60 = 480 tokens, two pad 4 x 60 + 4 x 20 = 320.
    assert length_buckets([60, 20, 60, 20, 20, 60, 20, 60], 4, overhead=100) == [([0, 2, 5, 7], 60),
                                                                                  ([1, 3, 4, 6], 20)]
    assert length_buckets([60, 20, 60, 20, 20, 60, 20, 60], 4, overhead=200) == [([0, 2, 5, 7, 1, 3, 4, 6], 60)]
    assert length_buckets([7, 7, 7], 4, overhead=0) == [([0, 1, 2], 7)]
    assert length_buckets([], 4) == []
