"""Learned reward models: the token layout shared by training and RL scoring, where a score is read, and
normalisation statistics."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from rlhf.config import DataConfig, ModelConfig, TinyModelConfig
from rlhf.data.tokenize import length_buckets
from rlhf.errors import ConfigError, RewardError
from rlhf.models import build_char_tokenizer, load_reward_model, load_tokenizer
from rlhf.models.packing import enable_packing
from rlhf.rewards.model import (
    INFO_FILE,
    Preference,
    RewardModel,
    RewardModelInfo,
    check_score,
    collate_preferences,
    collate_sequences,
    encode_preference,
    head_rewards,
    hidden_states,
    packed_hidden_states,
    read_scores,
    score_preferences,
    sequence_scores,
    token_rewards,
)
from tests.tiny_models import save_tiny_bert_classifier

ARCH = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=128)
CORPUS = ["the quick brown fox jumps over the lazy dog", "12+34=46", "hello world, hello there"] * 20
PROMPTS = ["12+34=", "the quick brown fox", "7+8=", "hello", "1+1="]
RESPONSES = ["46", " jumps over the lazy dog", "15 and more", "world", "2"]


def data_cfg(**overrides):
    return OmegaConf.structured(DataConfig(**overrides))


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE whose pad token is its EOS token (as in Qwen2 and many hub models)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def bos_chat_tokenizer() -> PreTrainedTokenizerFast:
    """Adds <s> to every encoding AND writes <s> from its chat template: the classic doubled-BOS trap."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)]
    backend = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(specials + chars)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(specials)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}"
                               "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    return tokenizer


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """llama: the char tokenizer (pad != eos); qwen2: pad token is EOS; gpt2: absolute position embeddings."""
    dirs = {}
    char = build_char_tokenizer()
    dirs["llama"] = tmp_path_factory.mktemp("llama")
    load_reward_model(ModelConfig(tiny=ARCH), char, seed=0).save_pretrained(dirs["llama"])
    char.save_pretrained(dirs["llama"])
    bpe = bpe_tokenizer()
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=128)
    for name, model in {
        "qwen2": Qwen2ForCausalLM(Qwen2Config(vocab_size=len(bpe), **small)),
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=len(bpe), n_embd=32, n_layer=2, n_head=2, n_positions=128)),
    }.items():
        dirs[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(dirs[name])
        bpe.save_pretrained(dirs[name])
    return dirs


def load(directory, seed=0):
    cfg = ModelConfig(name_or_path=str(directory))
    tokenizer = load_tokenizer(cfg)
    return load_reward_model(cfg, tokenizer, seed).eval(), tokenizer


def unpadded_score(model, ids):
    with torch.no_grad():
        hidden = model.base_model(input_ids=torch.tensor([ids])).last_hidden_state
        return model.score(hidden)[0, -1, 0].item()


# ---- the token layout -------------------------------------------------------------------------------------------

def test_chat_template_applied_once_and_bos_not_doubled():
    tokenizer = bos_chat_tokenizer()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    row = {"prompt": [{"role": "user", "content": "2+2="}], "chosen": "4", "rejected": "5"}
    example, cut = encode_preference(row, tokenizer, data_cfg())
    assert cut == 0
    assert example.prompt_ids.count(bos) == 1 and example.prompt_ids[0] == bos
    assert tokenizer.decode(example.prompt_ids) == "<s>[user]2+2=</s>[assistant]"
    assert [tokenizer.decode(r) for r in example.response_ids] == ["4</s>", "5</s>"]
    assert all(bos not in r and r[-1] == eos for r in example.response_ids)
    # A plain prompt gets exactly the tokenizer's own BOS.
    plain, _ = encode_preference({"prompt": "2+2=", "chosen": "4", "rejected": "5"}, tokenizer, data_cfg())
    assert plain.prompt_ids.count(bos) == 1
    # data.chat_template=true wraps a plain prompt in the template, still with one BOS.
    wrapped, _ = encode_preference({"prompt": "2+2=", "chosen": "4", "rejected": "5"}, tokenizer,
                                   data_cfg(chat_template=True))
    assert wrapped.prompt_ids == example.prompt_ids


def test_rl_scoring_builds_exactly_the_training_layout(model_dirs):
    """RewardModel.score_completions (RL time) and encode_preference (training) produce the same ids."""
    rm = RewardModel.from_pretrained(model_dirs["llama"], data_cfg=data_cfg(prompt_template="Q: {prompt} A:"))
    row = {"prompt": "12+34=", "chosen": "46", "rejected": "47"}
    trained, _ = encode_preference(row, rm.tokenizer, rm.data_cfg)
    at_rl_time = rm._examples([{"prompt": "12+34="}], ["46"])[0]
    assert at_rl_time.prompt_ids == trained.prompt_ids
    assert at_rl_time.response_ids == trained.response_ids[:1]
    assert rm.tokenizer.decode(trained.prompt_ids + trained.response_ids[0]) == "Q: 12+34= A:46<eos>"


def test_long_response_is_cut_with_eos_kept_last():
    tokenizer = build_char_tokenizer()
    example, cut = encode_preference({"prompt": "1+1=", "chosen": "2" * 50, "rejected": "3"}, tokenizer,
                                     data_cfg(max_length=10))
    assert cut == 1
    assert len(example.prompt_ids) + len(example.response_ids[0]) == 10
    assert example.response_ids[0][-1] == tokenizer.eos_token_id
    assert example.response_ids[1] == tokenizer("3", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_collate_puts_every_response_in_one_batch():
    batch = collate_preferences([Preference([1, 2], [[3], [4, 5]], margin=0.5),
                                 Preference([6], [[7], [8], [9, 9, 9]])], pad_id=0)
    assert batch["input_ids"].shape == (5, 4)
    assert batch["slots"].tolist() == [[0, 1, -1], [2, 3, 4]]
    assert batch["list_mask"].tolist() == [[True, True, False], [True, True, True]]
    assert batch["margin"].tolist() == [0.5, 0.0]
    assert batch["response_mask"][1].tolist() == [0, 0, 1, 1]
    assert batch["attention_mask"][4].tolist() == [1, 1, 1, 1]


# ---- where a score is read --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
def test_last_token_score_under_left_right_and_no_padding(model_dirs, name):
    """The score is the head at the true last token: right padding, left padding, and a pad token that is EOS
    with EOS inside the text all give the unpadded row's score."""
    model, tokenizer = load(model_dirs[name])
    eos = tokenizer.eos_token
    texts = [("12+34=", f"46{eos} and{eos}"), ("the quick brown fox jumps", " over"), ("7+8=", "15")]
    rows = [(tokenizer(p)["input_ids"], tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
            for p, r in texts]
    if name == "qwen2":
        assert tokenizer.pad_token_id == tokenizer.eos_token_id
        assert rows[0][1].count(tokenizer.eos_token_id) == 3  # EOS inside the text, and at its end
    expected = [unpadded_score(model, p + r) for p, r in rows]
    right = collate_sequences([p for p, _ in rows], [r for _, r in rows], tokenizer.pad_token_id)
    width = right["input_ids"].shape[1]
    pads = (width - right["attention_mask"].sum(-1)).tolist()
    left = {k: torch.stack([v[i].roll(n) for i, n in enumerate(pads)]) for k, v in right.items()}
    assert left["attention_mask"][:, -1].all() and not left["attention_mask"][:, 0].all()
    with torch.no_grad():
        for batch in (right, left):
            torch.testing.assert_close(sequence_scores(model, batch, "last_token").tolist(), expected, atol=1e-5,
                                       rtol=0)
    # Plain transformers pools at the last non-pad id: right on the char tokenizer, wrong when pad is EOS.
    if name == "llama":
        with torch.no_grad():
            hf = model(input_ids=right["input_ids"], attention_mask=right["attention_mask"]).logits[:, 0]
        torch.testing.assert_close(hf.tolist(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_scores_do_not_depend_on_batch_size(model_dirs, name):
    model, tokenizer = load(model_dirs[name])
    examples = []
    for i in range(16):
        row = {"prompt": PROMPTS[i % 5] * (1 + i % 3), "chosen": RESPONSES[i % 5], "rejected": RESPONSES[(i + 2) % 5]}
        examples.append(encode_preference(row, tokenizer, data_cfg())[0])
    for score in ("last_token", "sum"):
        one = score_preferences(model, examples, tokenizer.pad_token_id, score, 1, torch.device("cpu"))
        sixteen = score_preferences(model, examples, tokenizer.pad_token_id, score, 16, torch.device("cpu"))
        torch.testing.assert_close(torch.tensor(one), torch.tensor(sixteen), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_hidden_states_in_length_buckets_match_one_pass(model_dirs, name):
    """Rows run in passes of similar length give each row's real tokens the hidden states of one padded pass,
    under right and left padding, and the same gradient."""
    model, tokenizer = load(model_dirs[name])
    lengths = [3, 30, 4, 28, 5, 31, 2, 29]
    right = collate_sequences([[5, 6]] * len(lengths), [[7 + i % 9 for i in range(n)] for n in lengths],
                              tokenizer.pad_token_id)
    assert len(length_buckets(right["attention_mask"].sum(-1).tolist(), 4)) == 2  # the short rows run apart
    pads = (right["input_ids"].shape[1] - right["attention_mask"].sum(-1)).tolist()
    left = {k: torch.stack([v[i].roll(n) for i, n in enumerate(pads)]) for k, v in right.items()}
    for batch in (right, left):
        mask = batch["attention_mask"]
        one = hidden_states(model, batch["input_ids"], mask)
        bucketed = hidden_states(model, batch["input_ids"], mask, max_buckets=4)
        real = mask.bool()
        torch.testing.assert_close(bucketed[real], one[real], atol=1e-5, rtol=1e-4)
        grads = []
        for hidden in (one, bucketed):
            model.zero_grad()
            (hidden * real[..., None]).square().sum().backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
def test_a_shared_prompt_run_once_gives_the_scores_and_gradients_of_one_pass_per_row(model_dirs, name):
    """Preference lists laid out prompt first, each prompt run once for all of its responses (in length buckets or
    not), give every real token the hidden state of the plain right-padded pass, so the same scores (last token and
    summed), and the same gradient."""
    model, tokenizer = load(model_dirs[name])
    examples = [Preference([5 + i % 7 for i in range(n)], [[9] * a, [10] * b, [11] * c][:2 + n % 2])
                for n, a, b, c in ((3, 20, 2, 9), (9, 4, 30, 5), (1, 25, 3, 3), (6, 2, 2, 7))]
    plain = collate_preferences(examples, tokenizer.pad_token_id)
    first = collate_preferences(examples, tokenizer.pad_token_id, prompt_first=True)
    width = int(first["prompt_width"])
    assert width == 9 and torch.equal(first["slots"], plain["slots"])
    # where each row's real tokens sit in the two layouts
    real_plain, real_first = plain["attention_mask"].bool(), first["attention_mask"].bool()
    assert torch.equal(plain["input_ids"][real_plain], first["input_ids"][real_first])
    one = hidden_states(model, plain["input_ids"], plain["attention_mask"])
    for buckets in (1, 4):
        shared = hidden_states(model, first["input_ids"], first["attention_mask"], buckets, prompt_width=width)
        assert shared.shape[:2] == first["input_ids"].shape
        torch.testing.assert_close(shared[real_first], one[real_plain], atol=1e-5, rtol=1e-4)
        for score in ("last_token", "sum"):
            torch.testing.assert_close(read_scores(head_rewards(model, shared), first, score),
                                       read_scores(head_rewards(model, one), plain, score), atol=1e-5, rtol=1e-4)
    grads = []
    for batch, kwargs in ((plain, {}), (first, {"max_buckets": 4, "prompt_width": width})):
        model.zero_grad()
        hidden = hidden_states(model, batch["input_ids"], batch["attention_mask"], **kwargs)
        (hidden * batch["attention_mask"][..., None]).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    # the same sums in another order: GPT-2's gradient (transformers 5.25) differs by up to 1.2e-4 (0.2%) on single
    # elements, where a wrong mask or position would move many elements by far more
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-3)


def test_sum_score_is_the_sum_of_response_token_rewards(model_dirs):
    model, tokenizer = load(model_dirs["llama"])
    batch = collate_sequences([[5, 6, 7], [8]], [[9, 10, 1], [11, 1]], tokenizer.pad_token_id)
    with torch.no_grad():
        per_token = token_rewards(model, batch["input_ids"], batch["attention_mask"])
        summed = sequence_scores(model, batch, "sum")
    assert per_token.shape == (2, 6)
    torch.testing.assert_close(summed, torch.stack([per_token[0, 3:6].sum(), per_token[1, 1:3].sum()]))


def test_encoder_classifier_scores_through_its_own_head(tmp_path):
    """BERT-style reward models pool with their own head; they score but cannot give per-token rewards."""
    save_tiny_bert_classifier(tmp_path, max_positions=64)
    model, tokenizer = load(tmp_path)
    examples = [encode_preference({"prompt": p, "chosen": r, "rejected": r + "!"}, tokenizer, data_cfg())[0]
                for p, r in zip(PROMPTS, RESPONSES)]
    one = score_preferences(model, examples, tokenizer.pad_token_id, "last_token", 1, torch.device("cpu"))
    five = score_preferences(model, examples, tokenizer.pad_token_id, "last_token", 5, torch.device("cpu"))
    torch.testing.assert_close(torch.tensor(one), torch.tensor(five), atol=1e-5, rtol=0)
    check_score("last_token", model)
    with pytest.raises(ConfigError, match="algo.score=sum"):
        check_score("sum", model)
    with pytest.raises(ConfigError, match="last_token, sum"):
        check_score("mean", model)


# ---- loading a trained reward model, normalisation ---------------------------------------------------------------

def write_info(directory, **fields):
    (directory / INFO_FILE).write_text(RewardModelInfo(**fields).to_json())


def test_normalize_without_statistics_is_an_error(model_dirs, tmp_path):
    model, tokenizer = load(model_dirs["llama"])
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert RewardModel.from_pretrained(tmp_path).mean == 0.0  # not normalising: nothing to look up
    with pytest.raises(RewardError, match="no normalisation statistics") as error:
        RewardModel.from_pretrained(tmp_path, normalize=True)
    assert str(tmp_path) in str(error.value) and "reward.normalize=false" in str(error.value)
    write_info(tmp_path, mean=1.0, std=0.0)
    with pytest.raises(RewardError, match="unusable"):
        RewardModel.from_pretrained(tmp_path, normalize=True)
    (tmp_path / INFO_FILE).write_text("{not json")
    with pytest.raises(RewardError, match="invalid JSON"):
        RewardModel.from_pretrained(tmp_path)


def test_normalised_scores_use_the_saved_statistics(model_dirs, tmp_path):
    model, tokenizer = load(model_dirs["llama"])
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    write_info(tmp_path, mean=0.5, std=2.0, num_scores=10, prompt_template="Q: {prompt} A:")
    raw = RewardModel.from_pretrained(tmp_path)
    normed = RewardModel.from_pretrained(tmp_path, normalize=True)
    assert raw.data_cfg.prompt_template == "Q: {prompt} A:"
    scores, normalised = raw.score_texts(PROMPTS, RESPONSES), normed.score_texts(PROMPTS, RESPONSES)
    assert normalised == pytest.approx([(s - 0.5) / 2.0 for s in scores])
    # The reward-function signature, with dataset columns as keywords and chat completions.
    chat = [[{"role": "assistant", "content": r}] for r in RESPONSES]
    assert normed(PROMPTS, chat, answer=["x"] * 5) == pytest.approx(normalised)
    per_token = raw.per_token_rewards([{"prompt": p} for p in PROMPTS], RESPONSES)
    assert [len(t) for t in per_token] == [len(r) + 1 for r in RESPONSES]  # characters + EOS
    # OpenRLHF keeps mean/std in config.json; those are used when reward_model.json has none.
    (tmp_path / INFO_FILE).unlink()
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "mean": 0.5, "std": 2.0}))
    plain = RewardModel.from_pretrained(tmp_path).score_texts(PROMPTS, RESPONSES)
    assert RewardModel.from_pretrained(tmp_path, normalize=True).score_texts(PROMPTS, RESPONSES) == pytest.approx(
        [(s - 0.5) / 2.0 for s in plain])
    with pytest.raises(RewardError, match="2 prompt rows but 1 completions"):
        raw.score_texts(PROMPTS[:2], RESPONSES[:1])


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
def test_a_packed_batch_gives_the_scores_and_gradients_of_one_pass_per_row(model_dirs, name):
    """Preference lists packed padding-free (each prompt once for its responses) give every real token the hidden
    state of the plain right-padded pass, so the same scores (last token and summed), and the same gradient;
    score_preferences packs on a model switched to the packed attention and scores the same."""
    model, tokenizer = load(model_dirs[name])
    assert enable_packing(model)
    examples = [Preference([5 + i % 7 for i in range(n)], [[9] * a, [10] * b, [11] * c][:2 + n % 2])
                for n, a, b, c in ((3, 20, 2, 9), (9, 4, 30, 5), (1, 25, 3, 3), (6, 2, 2, 7))]
    plain = collate_preferences(examples, tokenizer.pad_token_id)
    packed = collate_preferences(examples, tokenizer.pad_token_id, packed=True)
    responses = sum(len(e.response_ids) for e in examples)
    assert packed["packed_ids"].shape[1] == sum(len(e.prompt_ids) + sum(map(len, e.response_ids)) for e in examples)
    assert packed["packed_rows"].shape == plain["input_ids"].shape == (responses, plain["input_ids"].shape[1])
    real = plain["attention_mask"].bool()
    grads = []
    for batch in (plain, packed):
        model.zero_grad()
        hidden = (packed_hidden_states(model, batch) if batch is packed
                  else hidden_states(model, batch["input_ids"], batch["attention_mask"]))
        (hidden * real[..., None]).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        if batch is packed:
            torch.testing.assert_close(hidden[real], one[real], atol=1e-5, rtol=1e-4)
            for score in ("last_token", "sum"):
                torch.testing.assert_close(sequence_scores(model, packed, score), sequence_scores(model, plain, score),
                                           atol=1e-5, rtol=1e-4)
        one = hidden.detach()
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-3)  # GPT-2: see the shared-prompt test
    fresh, _ = load(model_dirs[name])
    flat = [s for scores in score_preferences(model, examples, tokenizer.pad_token_id, "sum", 3, torch.device("cpu"))
            for s in scores]
    assert flat == pytest.approx([s for scores in score_preferences(fresh, examples, tokenizer.pad_token_id, "sum", 3,
                                                                    torch.device("cpu")) for s in scores], abs=1e-5)
