"""Padding-free batches: the packed layout, and a packed pass giving the numbers of one pass per row."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from rlhf.algos.sft import sft_loss
from rlhf.data.tokenize import Encoded, collate_lm, collate_lm_packed
from rlhf.models.packing import (
    PACKED_SDPA,
    PackedLayout,
    batch_forward,
    enable_packing,
    pack,
    packed_forward,
    to_rows,
)

SMALL = dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def build(name: str, attn: str = "sdpa"):
    torch.manual_seed(0)
    if name == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SMALL, attn_implementation=attn))
    elif name == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**SMALL, attn_implementation=attn))
    else:  # absolute position embeddings
        model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                           bos_token_id=0, eos_token_id=0, attn_implementation=attn))
    return model.eval()  # GPT-2 has dropout: the passes must be deterministic to compare


def test_pack_lays_out_rows_and_shares_prefixes_by_hand():
    rows = [[1, 2, 3, 4], [1, 2, 3, 9, 8], [7], [1, 2, 5]]
    out = pack(rows, [("p", 3), ("p", 3), ("q", 1), ("p", 2)])
    # row 1 reads row 0's prompt; row 3 has another prefix length, so nothing is shared with it
    assert out["packed_ids"].tolist() == [[1, 2, 3, 4, 9, 8, 7, 1, 2, 5]]
    assert out["packed_positions"].tolist() == [[0, 1, 2, 3, 3, 4, 0, 0, 1, 2]]
    end = 10
    assert out["packed_rows"].tolist() == [[0, 1, 2, 3, end], [0, 1, 2, 4, 5], [6, end, end, end, end],
                                           [7, 8, 9, end, end]]
    # each packed token's output is read where it first appears: b * 5 + t
    assert out["packed_owner"].tolist() == [0, 1, 2, 3, 8, 9, 10, 15, 16, 17]
    plain = pack(rows)
    assert plain["packed_ids"].shape[1] == sum(map(len, rows))
    layout = lambda out: PackedLayout(out["packed_rows"], out["packed_owner"])
    assert not layout(out).dense and not layout(plain).dense  # shared or padded positions: attention gathers
    assert layout(pack([[1, 2], [3, 4], [5, 6]])).dense  # equal rows, nothing shared: a view
    assert not layout(pack([[1, 2], [1, 4]], [("p", 1), ("p", 1)])).dense


def test_to_rows_copies_shared_tokens_and_sums_their_gradient():
    out = pack([[1, 2, 3], [1, 2, 4]], [("p", 2), ("p", 2)])
    values = torch.arange(4.0, requires_grad=True)  # one per packed token
    rows = to_rows(values[None, :, None], out["packed_rows"])
    assert rows[..., 0].tolist() == [[0.0, 1.0, 2.0], [0.0, 1.0, 3.0]]
    rows.sum().backward()
    assert values.grad.flatten().tolist() == [2.0, 2.0, 1.0, 1.0]
    dense = pack([[1, 2], [3, 4]])  # equal rows, nothing shared: the rows are a view of the packed tokens
    values = torch.arange(4.0, requires_grad=True)
    rows = to_rows(values[None, :, None], dense["packed_rows"])
    assert rows[..., 0].tolist() == [[0.0, 1.0], [2.0, 3.0]] and rows.data_ptr() == values.data_ptr()
    rows.sum().backward()
    assert values.grad.tolist() == [1.0, 1.0, 1.0, 1.0]


UNEQUAL = [Encoded([3, 4, 5], [6, 7, 8, 9, 1]), Encoded([3], [9, 1]), Encoded([2, 2, 2, 2, 2, 2], [5, 1]),
           Encoded([8, 9], [10, 11, 12, 13, 14, 15, 16, 1])]
EQUAL = [Encoded([3, 4, 5], [6, 7, 1]), Encoded([3], [9, 8, 7, 6, 1]), Encoded([2, 2, 2, 2, 2], [1])]


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("rows", [UNEQUAL, EQUAL], ids=["unequal", "equal"])
def test_packed_sft_batch_gives_the_padded_loss_logits_and_gradient(name, rows):
    """Rows packed: every real position's logits, the completion-only loss and the gradient are those of the
    right-padded batch (Llama and Qwen2 with grouped keys and rotary positions, GPT-2 with absolute position
    embeddings). Rows of unequal length go through attention gathered into the rows' layout; rows of one length
    through a view of the packed tokens (a dense layout)."""
    model = build(name)
    padded = collate_lm(rows, pad_id=0)
    assert enable_packing(model) and model.config._attn_implementation == PACKED_SDPA
    packed = collate_lm_packed(rows)
    assert PackedLayout(packed["packed_rows"], packed["packed_owner"]).dense == (rows is EQUAL)
    assert packed["input_ids"].shape == (1, sum(len(e.prompt_ids) + len(e.response_ids) for e in rows))
    assert packed["loss_mask"].sum() == padded["loss_mask"].sum() == sum(len(e.response_ids) for e in rows)
    results = []
    for batch in (padded, packed):
        model.zero_grad()
        logits = batch_forward(model, batch).logits
        loss = sft_loss(logits, batch["input_ids"], batch["loss_mask"], float(batch["loss_mask"].sum()))
        loss.backward()
        results.append((logits, loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (pad_logits, pad_loss, pad_grad), (pack_logits, pack_loss, pack_grad) = results
    real = padded["attention_mask"].bool()
    torch.testing.assert_close(to_rows(pack_logits, packed["packed_rows"])[real], pad_logits[real],
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(pack_loss, pad_loss)
    torch.testing.assert_close(pack_grad, pad_grad, atol=1e-5, rtol=1e-3)


def test_a_model_on_other_attention_stays_padded_and_a_packed_batch_is_refused_there():
    model = build("llama", attn="eager")
    assert not enable_packing(model)
    batch = pack([[1, 2], [3]])
    with pytest.raises(RuntimeError, match="enable_packing"):
        packed_forward(model, batch)


def test_packed_wrapper_leaves_padded_passes_and_generation_as_they_were():
    model, packed_model = build("llama"), build("llama")
    enable_packing(packed_model)
    ids = torch.tensor([[3, 4, 5, 6], [0, 0, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    with torch.no_grad():
        torch.testing.assert_close(packed_model(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits)
        generated = [m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                pad_token_id=0) for m in (model, packed_model)]
    assert torch.equal(*generated)
