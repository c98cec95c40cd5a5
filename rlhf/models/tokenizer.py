"""The embedded character tokenizer: one token per printable-ASCII character, no download needed."""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN, *ROLE_TOKENS)
CHARACTERS = tuple(chr(code) for code in range(32, 127)) + ("\n", "\t")
# R1's reasoning tags are one token each, as in the tokenizers of reasoning models: a built-in task's answer is then
# about 20 tokens instead of about 50, so every stage generates and trains on fewer than half the positions.
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")

# `<|role|>content<eos>` per message: the role marker tells the model who speaks, `<eos>` ends the turn so
# generation stops there. Unknown roles fail loudly instead of rendering a marker the vocabulary lacks.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown chat role: ' + message['role'] + ' (expected system, user or assistant)') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer whose ids depend only on this file, so the tiny model and its checkpoints are reproducible.

    Splitting into single characters before a word-level lookup makes every character its own token; the
    `Fuse` decoder joins them back without inserting spaces, so decoding is the exact inverse of encoding.
    """
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARACTERS + TAG_TOKENS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    # Not special: decoding keeps them (skip_special_tokens drops only the markers above), as the rewards read them.
    backend.add_tokens([AddedToken(token, special=False, normalized=False) for token in TAG_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens=list(ROLE_TOKENS),
        model_max_length=1_000_000,
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
