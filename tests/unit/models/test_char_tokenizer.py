import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from rlhf.models import build_char_tokenizer
from rlhf.models.tokenizer import CHARACTERS, ROLE_TOKENS, SPECIAL_TOKENS, TAG_TOKENS

PRINTABLE = st.text(alphabet=st.sampled_from(CHARACTERS), max_size=80)
MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "  47+38= \n"},
    {"role": "assistant", "content": "<think>7+8=15</think> 85"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def reloaded(tokenizer, tmp_path_factory):
    directory = tmp_path_factory.mktemp("char_tokenizer")
    tokenizer.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def test_special_token_ids(tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.convert_tokens_to_ids(list(ROLE_TOKENS)) == [3, 4, 5]
    assert tokenizer.bos_token is None
    assert len(tokenizer) == 6 + 95 + 2 + 4
    assert tokenizer.convert_tokens_to_ids(list(TAG_TOKENS)) == [103, 104, 105, 106]
    assert tokenizer.model_max_length >= 100_000


def test_vocabulary_is_deterministic(tokenizer):
    assert build_char_tokenizer().get_vocab() == tokenizer.get_vocab()


@settings(max_examples=200, deadline=None)
@given(text=PRINTABLE)
def test_round_trip_one_token_per_char(tokenizer, text):
    # A special token's spelling ("<eos>") is meant to encode as that token, which decoding then skips.
    assume(not any(token in text for token in SPECIAL_TOKENS + TAG_TOKENS))
    ids = tokenizer.encode(text)
    assert len(ids) == len(text)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


@settings(max_examples=100, deadline=None)
@given(parts=st.lists(st.one_of(PRINTABLE, st.sampled_from(TAG_TOKENS)), max_size=6))
def test_reasoning_tags_are_one_token_each_and_survive_decoding(tokenizer, parts):
    text = "".join(parts)
    assume(not any(token in text for token in SPECIAL_TOKENS))
    # skip_special_tokens drops the markers only: the rewards read the tags in the decoded text.
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == text


def test_a_task_answer_is_short(tokenizer):
    answer = "<think>7+8=15,4+3+1=8</think><answer>85</answer>"
    tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode(answer))
    assert tokens[0] == "<think>" and tokens[-3:] == ["8", "5", "</answer>"] and len(tokens) == len(answer) - 28
    assert len(tokenizer.encode("<thin k></answer >")) == 18


WHITESPACE_AND_PUNCTUATION = [
    "",
    " ",
    "   a  b   ",
    "\n\nx\n",
    "\t 1 . 2 , 3 's n't ?",
    "<think>a<b>c</think><eos >",
    "".join(CHARACTERS),
]


@pytest.mark.parametrize("text", WHITESPACE_AND_PUNCTUATION)
def test_round_trip_whitespace_and_punctuation(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == text


def test_unknown_characters_map_to_unk(tokenizer):
    ids = tokenizer.encode("aé€b")
    assert ids == [tokenizer.convert_tokens_to_ids("a"), 2, 2, tokenizer.convert_tokens_to_ids("b")]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab"


@pytest.mark.parametrize("token", ["<eos>", "<pad>", *ROLE_TOKENS])
def test_special_tokens_in_text_are_single_ids(tokenizer, token):
    ids = tokenizer.encode(f"a{token}b")
    assert ids[1] == tokenizer.convert_tokens_to_ids(token)
    assert len(ids) == 3
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab"
    assert tokenizer.decode(ids) == f"a{token}b"


def test_chat_template(tokenizer):
    rendered = tokenizer.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|system|>Answer briefly.<eos><|user|>  47+38= \n<eos><|assistant|>"
    full = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    assert full.endswith("<|assistant|><think>7+8=15</think> 85<eos>")
    ids = tokenizer.encode(rendered)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|system|>")
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")


def test_chat_template_rejects_unknown_role(tokenizer):
    with pytest.raises(Exception, match="Unknown chat role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_batch_pads_on_the_right_with_pad_id(tokenizer):
    batch = tokenizer(["abc", "a"], padding=True, return_tensors="pt")
    assert batch["input_ids"][1].tolist()[1:] == [0, 0]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_save_load_identical(tokenizer, reloaded):
    texts = ["  hello \n world ", "é<eos><|user|>x", "\t12+3=", "", "<think>1+2=3</think><answer>3</answer>"]
    for text in texts:
        assert reloaded.encode(text) == tokenizer.encode(text)
        ids = tokenizer.encode(text)
        assert reloaded.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids, skip_special_tokens=True)
        assert reloaded.decode(ids) == tokenizer.decode(ids)
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    assert reloaded.all_special_tokens == tokenizer.all_special_tokens
    assert (reloaded.pad_token_id, reloaded.eos_token_id, reloaded.bos_token_id) == (0, 1, None)
    for generation_prompt in (False, True):
        assert reloaded.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=generation_prompt
        ) == tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=generation_prompt)


@settings(max_examples=50, deadline=None)
@given(text=PRINTABLE)
def test_reloaded_round_trip(reloaded, text):
    assume(not any(token in text for token in SPECIAL_TOKENS))
    assert reloaded.decode(reloaded.encode(text), skip_special_tokens=True) == text
