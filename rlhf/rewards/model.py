"""Learned reward models: the token layout they are trained and scored on, their forward pass, and scoring.

A reward model sees `render_prompt` -> `encode_prompt` (the chat template applied once, no doubled BOS), then
each response through `encode_response` (closed by EOS). `encode_preference` builds that layout for training
and evaluation, and `RewardModel.score_completions` builds the same one at RL time, so the model is scored on
exactly the format it was trained on. `reward_model.json`, saved beside the weights by `rlhf train-rm`, records
how a score is read (last token or per-token sum), the prompt format, and the reward mean/std over the training
set that `reward.normalize` uses.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from rlhf.algos.reward_model import dense_scores, last_token_index
from rlhf.config import DataConfig
from rlhf.data.tokenize import encode_prompt, encode_response, length_buckets, pad, render_prompt
from rlhf.errors import ConfigError, RewardError
from rlhf.models.packing import enable_packing, pack, packed_forward, supports_packing, to_rows
from rlhf.models.prefix import distinct_rows, run_continuation, run_prefix, selected_cache
from rlhf.rewards.rules import completion_text

INFO_FILE = "reward_model.json"
SCORES = ("last_token", "sum")


@dataclass
class Preference:
    """One prompt's responses, best first (a chosen/rejected pair is K = 2), as token ids."""

    prompt_ids: list[int]
    response_ids: list[list[int]]
    margin: float = 0.0

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + max(len(r) for r in self.response_ids)


def encode_response_for_reward(text: str, prompt_len: int, tokenizer, max_length: int) -> tuple[list[int], bool]:
    """The response's ids closed by EOS; one too long for max_length is cut, keeping the EOS last so the score is
    always read at the token it was trained on. Returns (ids, whether it was cut)."""
    ids = encode_response(text, tokenizer)
    budget = max(max_length - prompt_len, 1)
    if len(ids) <= budget:
        return ids, False
    closing = [ids[-1]] if tokenizer.eos_token_id is not None else []
    return ids[:budget - len(closing)] + closing, True


def encode_preference(row: Mapping[str, Any], tokenizer, data_cfg: Any) -> tuple[Preference, int]:
    """A canonical preference row (prompt + chosen/rejected, or prompt + responses) -> (Preference, responses cut)."""
    text, from_chat = render_prompt(row, tokenizer, data_cfg)
    prompt_ids = encode_prompt(text, from_chat, tokenizer)
    responses = row["responses"] if row.get("responses") is not None else [row["chosen"], row["rejected"]]
    encoded = [encode_response_for_reward(str(r), len(prompt_ids), tokenizer, data_cfg.max_length)
               for r in responses]
    margin = row.get("margin")
    return Preference(prompt_ids, [ids for ids, _ in encoded], float(margin or 0.0)), sum(cut for _, cut in encoded)


def collate_sequences(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                      pad_id: int) -> dict[str, Tensor]:
    """Right-padded prompt+response rows with attention_mask and response_mask (the response's own tokens)."""
    ids = [list(p) + list(r) for p, r in zip(prompts, responses)]
    return {"input_ids": pad(ids, pad_id),
            "attention_mask": pad([[1] * len(s) for s in ids], 0),
            "response_mask": pad([[0] * len(p) + [1] * len(r) for p, r in zip(prompts, responses)], 0)}


def collate_prompt_first(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                         pad_id: int) -> dict[str, Tensor]:
    """Rows laid out as [prompt, left-padded | response, right-padded]: every response starts at column
    `prompt_width`, so rows with the same prompt can share one pass of it (hidden_states' prompt_width)."""
    prompt_ids, response_ids = pad(prompts, pad_id, side="left"), pad(responses, pad_id)
    prompt_mask = pad([[1] * len(p) for p in prompts], 0, side="left")
    response_mask = pad([[1] * len(r) for r in responses], 0)
    return {"input_ids": torch.cat([prompt_ids, response_ids], dim=1),
            "attention_mask": torch.cat([prompt_mask, response_mask], dim=1),
            "response_mask": torch.cat([torch.zeros_like(prompt_mask), response_mask], dim=1),
            "prompt_width": torch.tensor(prompt_ids.shape[1])}


def collate_preferences(batch: Sequence[Preference], pad_id: int, prompt_first: bool = False,
                        packed: bool = False) -> dict[str, Tensor]:
    """Every response of every list in one batch of sequences (one forward pass for chosen and rejected alike),
    plus `slots` [N, K]: which sequence holds list n's k-th response, `list_mask` [N, K] and `margin` [N].
    Right-padded rows, or with prompt_first the layout of collate_prompt_first; `packed` adds the rows packed
    (rlhf.models.packing.pack), each prompt once for the responses that continue it (packed_hidden_states)."""
    width = max(len(p.response_ids) for p in batch)
    prompts, responses, slots = [], [], []
    for p in batch:
        row = []
        for response in p.response_ids:
            row.append(len(responses))
            prompts.append(p.prompt_ids)
            responses.append(response)
        slots.append(row + [-1] * (width - len(row)))
    out = (collate_prompt_first if prompt_first else collate_sequences)(prompts, responses, pad_id)
    if packed:
        out.update(pack([list(p) + list(r) for p, r in zip(prompts, responses)],
                        [(tuple(p), len(p)) for p in prompts]))
    out["slots"] = torch.tensor(slots, dtype=torch.long)
    out["list_mask"] = out["slots"] >= 0
    out["margin"] = torch.tensor([p.margin for p in batch], dtype=torch.float32)
    return out


def has_token_head(classifier: nn.Module) -> bool:
    """Decoder-style classifiers (Llama, Qwen2, GPT-2, ...) have a linear `score` head that can score every
    position; encoder classifiers (BERT, DeBERTa) pool the sequence through their own head instead."""
    head = getattr(classifier, "score", None)
    return isinstance(head, nn.Linear) and head.out_features == 1


def check_score(score: str, classifier: nn.Module) -> None:
    if score not in SCORES:
        raise ConfigError(f"algo.score must be one of {', '.join(SCORES)}, got {score!r}")
    if score == "sum" and not has_token_head(classifier):
        raise ConfigError(f"algo.score=sum needs a reward per token, which {type(classifier).__name__} (an encoder "
                          "classifier with its own pooling head) cannot give; use algo.score=last_token")


def hidden_states(classifier: nn.Module, input_ids: Tensor, attention_mask: Tensor, max_buckets: int = 1,
                  prompt_width: int = 0) -> Tensor:
    """The backbone's last hidden states [B, T, H]. Position ids follow the attention mask, so a row scores the
    same under left padding, right padding or none.

    With max_buckets > 1 the rows run in up to that many forward passes of rows of similar length, each cut to its
    own longest row (`length_buckets`), where that saves padded work. With prompt_width > 0 (rows laid out by
    collate_prompt_first) each distinct prompt runs once, its keys and values shared by the rows that continue it
    (a preference's chosen and rejected responses), and only the responses run in those passes. Padding positions
    hold no meaningful state either way (0 where a pass stopped short of the batch's width).
    Every pass is a collective under ZeRO-3, where ranks would disagree on their number: keep 1 and 0 there."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    backbone, p = classifier.base_model, prompt_width
    if p:
        holders, owner = distinct_rows(input_ids[:, :p], attention_mask[:, :p])
        prompt, cache = run_prefix(backbone, input_ids[holders, :p], attention_mask[holders, :p],
                                   position_ids[holders, :p])

    def forward(rows, length: int) -> Tensor:
        if not p:
            return backbone(input_ids=input_ids[rows, :length], attention_mask=attention_mask[rows, :length],
                            position_ids=position_ids[rows, :length], use_cache=False).last_hidden_state
        rows = torch.arange(len(input_ids), device=input_ids.device)[rows]
        return run_continuation(backbone, selected_cache(cache, owner[rows], backbone.config),
                                input_ids[rows, p:p + length], attention_mask[rows, :p + length],
                                position_ids[rows, p:p + length]).last_hidden_state

    width = input_ids.shape[1] - p
    buckets = []
    if max_buckets > 1:
        buckets = length_buckets((last_token_index(attention_mask) + 1 - p).tolist(), max_buckets)
    if len(buckets) <= 1:
        out = forward(slice(None), width)
    else:
        out = None
        for rows, length in buckets:
            index = torch.tensor(rows, device=input_ids.device)
            hidden = forward(index, length)
            if out is None:
                out = hidden.new_zeros(len(input_ids), width, hidden.shape[-1])
            out = out.index_copy(0, index, nn.functional.pad(hidden, (0, 0, 0, width - length)))
    return torch.cat([prompt.last_hidden_state[owner], out], dim=1) if p else out


def packed_hidden_states(classifier: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """hidden_states of a packed batch (collate_preferences with packed=True) in its rows' layout [B, T, H]: one
    padding-free forward pass, each prompt run once."""
    hidden = packed_forward(classifier.base_model, batch).last_hidden_state
    return to_rows(hidden, batch["packed_rows"])


def head_rewards(classifier: nn.Module, hidden: Tensor) -> Tensor:
    """The score head at every position of hidden states [B, T, H], [B, T] in float32."""
    return classifier.score(hidden).squeeze(-1).float()


def token_rewards(classifier: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The score head at every position, [B, T] in float32."""
    return head_rewards(classifier, hidden_states(classifier, input_ids, attention_mask))


def read_scores(rewards: Tensor, batch: Mapping[str, Tensor], score: str) -> Tensor:
    """One reward per sequence [B] from per-position rewards [B, T]: at the last real token (found from the mask,
    never from ids, which breaks when the pad token is EOS) or summed over the response."""
    if score == "sum":
        return dense_scores(rewards, batch["response_mask"])
    return rewards.gather(-1, last_token_index(batch["attention_mask"]).unsqueeze(-1)).squeeze(-1)


def sequence_scores(classifier: nn.Module, batch: Mapping[str, Tensor], score: str) -> Tensor:
    """One reward per sequence [B] (see read_scores), from a padded or a packed batch; encoder classifiers give
    their own pooled output (right padding)."""
    if not has_token_head(classifier):
        return classifier(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].float()
    hidden = (packed_hidden_states(classifier, batch) if "packed_rows" in batch
              else hidden_states(classifier, batch["input_ids"], batch["attention_mask"]))
    return read_scores(head_rewards(classifier, hidden), batch, score)


def list_scores(flat: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
    """Sequence scores [S] -> [N, K] lists, best first; padded slots hold 0 (and are masked by list_mask)."""
    return torch.where(batch["list_mask"], flat[batch["slots"].clamp_min(0)], torch.zeros((), device=flat.device))


@torch.no_grad()
def score_preferences(classifier: nn.Module, examples: Sequence[Preference], pad_id: int, score: str,
                      batch_size: int, device: torch.device) -> list[list[float]]:
    """Scores of each example's responses (best first), batch_size lists per forward pass, in eval mode."""
    was_training = classifier.training
    classifier.eval()
    packed = has_token_head(classifier) and supports_packing(classifier)
    out: list[list[float]] = []
    for start in range(0, len(examples), max(batch_size, 1)):
        chunk = examples[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate_preferences(chunk, pad_id, packed=packed).items()}
        flat = sequence_scores(classifier, batch, score).cpu().tolist()
        out += [[flat[s] for s in slots if s >= 0] for slots in batch["slots"].tolist()]
    classifier.train(was_training)
    return out


@dataclass
class RewardModelInfo:
    """What `reward_model.json` holds: how to score, the prompt format trained on, and normalisation statistics."""

    score: str = "last_token"
    prompt_template: str = "{prompt}"
    chat_template: Optional[bool] = None
    max_length: int = 256
    mean: Optional[float] = None
    std: Optional[float] = None
    num_scores: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def read(cls, directory: str | Path) -> Optional["RewardModelInfo"]:
        path = Path(directory) / INFO_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise RewardError(f"{path}: invalid JSON ({error.msg}); delete it or re-export the reward model") from None
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def normalisation(info: Optional[RewardModelInfo], config: Any, source: str) -> tuple[float, float]:
    """(mean, std) for reward.normalize: reward_model.json's, else OpenRLHF's `mean`/`std` in config.json.

    Missing statistics are an error, never a silent (0, 1)."""
    if info is not None and info.mean is not None and info.std is not None:
        mean, std = info.mean, info.std
    elif isinstance(getattr(config, "mean", None), (int, float)) and isinstance(getattr(config, "std", None),
                                                                                (int, float)):
        mean, std = float(config.mean), float(config.std)
    else:
        raise RewardError(
            f"reward.normalize=true but the reward model {source} has no normalisation statistics (no mean/std in "
            f"{INFO_FILE} or config.json); re-export it with `rlhf train-rm`, or set reward.normalize=false")
    if not (math.isfinite(mean) and math.isfinite(std)) or std <= 0:
        raise RewardError(f"the reward model {source} has unusable normalisation statistics mean={mean}, std={std}")
    return mean, std


def _check_is_classifier(path: str | Path) -> None:
    """A reward model must be a sequence classifier: a causal LM given here would get a random score head."""
    from transformers import AutoConfig

    from rlhf.errors import ModelError
    from rlhf.models.zoo import is_sequence_classifier

    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as error:
        raise ModelError(f"reward model {path} is neither a local model directory nor a reachable hub id "
                         f"({str(error).strip().splitlines()[0]})") from None
    if not is_sequence_classifier(config):
        kind = ", ".join(config.architectures or []) or config.model_type
        raise ModelError(f"reward model {path} is a {kind}, not a sequence classifier: point reward.model_path at "
                         "the final/ of `rlhf train-rm` (or any one-label AutoModelForSequenceClassification)")


class RewardModel:
    """A trained reward model ready to score completions: `__call__` has the reward-function signature
    f(prompts, completions, **columns) -> list[float]."""

    def __init__(self, classifier: nn.Module, tokenizer, info: RewardModelInfo, data_cfg: Any,
                 normalize: bool = False, batch_size: int = 64, source: str = "reward model"):
        self.classifier = classifier.eval().requires_grad_(False)
        enable_packing(classifier)  # scored padding-free, a group's prompt once (same scores)
        self.tokenizer, self.info, self.data_cfg, self.batch_size = tokenizer, info, data_cfg, batch_size
        check_score(info.score, classifier)
        self.mean, self.std = normalisation(info, classifier.config, source) if normalize else (0.0, 1.0)

    @classmethod
    def from_pretrained(cls, path: str | Path, normalize: bool = False, dtype: str = "fp32",
                        device: Optional[torch.device] = None, batch_size: int = 64,
                        data_cfg: Optional[Any] = None) -> "RewardModel":
        """Load a reward model directory. Prompts are rendered as the model was trained (reward_model.json's
        prompt_template and chat_template) unless `data_cfg` is given."""
        from rlhf.config import ModelConfig
        from rlhf.models.zoo import load_reward_model, load_tokenizer

        model_cfg = ModelConfig(name_or_path=str(path), dtype=dtype)
        _check_is_classifier(path)
        tokenizer = load_tokenizer(model_cfg)
        classifier = load_reward_model(model_cfg, tokenizer, seed=0)
        if device is not None:
            classifier.to(device)
        # A reward model trained elsewhere has no reward_model.json: read the last token, up to its context length.
        info = RewardModelInfo.read(path) or RewardModelInfo(
            max_length=getattr(classifier.config, "max_position_embeddings", None) or 2048)
        if data_cfg is None:
            data_cfg = OmegaConf.structured(DataConfig(prompt_template=info.prompt_template,
                                                       chat_template=info.chat_template, max_length=info.max_length))
        return cls(classifier, tokenizer, info, data_cfg, normalize, batch_size, str(path))

    @property
    def device(self) -> torch.device:
        return next(self.classifier.parameters()).device

    def _examples(self, rows: Sequence[Mapping[str, Any]], completions: Sequence[Any]) -> list[Preference]:
        if len(rows) != len(completions):
            raise RewardError(f"{len(rows)} prompt rows but {len(completions)} completions")
        examples = []
        for i, (row, completion) in enumerate(zip(rows, completions)):
            text, from_chat = render_prompt(row, self.tokenizer, self.data_cfg)
            prompt_ids = encode_prompt(text, from_chat, self.tokenizer)
            ids, _ = encode_response_for_reward(completion_text(completion, i), len(prompt_ids), self.tokenizer,
                                                self.data_cfg.max_length)
            examples.append(Preference(prompt_ids, [ids]))
        return examples

    def score_completions(self, rows: Sequence[Mapping[str, Any]], completions: Sequence[Any]) -> list[float]:
        """One score per (prompt row, completion): rows are canonical prompt rows (`prompt` a string or chat
        messages, plus any columns data.prompt_template names); completions are text or assistant messages."""
        scores = score_preferences(self.classifier, self._examples(rows, completions), self.tokenizer.pad_token_id,
                                   self.info.score, self.batch_size, self.device)
        return [(s[0] - self.mean) / self.std for s in scores]

    def score_texts(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[float]:
        """score_completions for bare prompts (strings or message lists)."""
        return self.score_completions([{"prompt": p} for p in prompts], completions)

    @torch.no_grad()
    def per_token_rewards(self, rows: Sequence[Mapping[str, Any]], completions: Sequence[Any],
                          response_ids: Optional[Sequence[Sequence[int]]] = None) -> list[list[float]]:
        """Per-token rewards of each completion's tokens (EOS last), for dense rewards in PPO; their sum is the
        score of a model trained with algo.score=sum. Not normalised. `response_ids`: score exactly these tokens
        (a policy sharing this tokenizer: decoding and re-encoding may not give its tokens back), closed by EOS
        when they do not end with it."""
        if not has_token_head(self.classifier):
            raise RewardError(f"{type(self.classifier).__name__} gives one score per sequence, not per token")
        examples = self._examples(rows, completions)
        if response_ids is not None:
            eos = self.tokenizer.eos_token_id
            examples = [Preference(e.prompt_ids, [list(ids) + ([eos] if eos is not None and (not ids or ids[-1] != eos)
                                                               else [])])
                        for e, ids in zip(examples, response_ids)]
        out = []
        for example in examples:
            batch = collate_sequences([example.prompt_ids], example.response_ids, self.tokenizer.pad_token_id)
            rewards = token_rewards(self.classifier, batch["input_ids"].to(self.device),
                                    batch["attention_mask"].to(self.device))[0]
            out.append(rewards[len(example.prompt_ids):].cpu().tolist())
        return out

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Sequence[Any]) -> list[float]:
        rows = [{"prompt": p, **{k: v[i] for k, v in columns.items()}} for i, p in enumerate(prompts)]
        return self.score_completions(rows, completions)

