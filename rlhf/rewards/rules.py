"""Rule-based rewards with TRL's signature: f(prompts, completions, **columns) -> list[float | None].

`completions` holds strings, or for chat data message lists like [{"role": "assistant", "content": ...}].
Dataset columns arrive as keyword arguments (the accuracy reward reads `answer`). None means "no
opinion on this row" (TRL skips it when summing several reward functions).
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any, Callable, Iterable, Optional

from rlhf.errors import DataError, RewardError
from rlhf.registry import Registry

RewardFunc = Callable[..., list]
REWARD_FUNCS: Registry[RewardFunc] = Registry("reward function")

# The data columns a built-in rule cannot score without, and what each holds. Checked when the rows load
# (check_columns), so a missing column fails before any generation rather than at the first reward call.
REQUIRED_COLUMNS: dict[str, dict[str, str]] = {
    "accuracy": {"answer": "the reference answer"},
    "code": {"tests": "the test cases the code must pass"},
}

# The innermost <answer>...</answer> pairs: in "<answer><answer>5</answer></answer>" the answer is 5.
_ANSWER_TAG = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)
_GSM8K_ANSWER = re.compile(r"####[ \t]*([^\n]*)")
# gsm8k's grader reads the number right after ####, so "#### 72 dollars" answers 72.
_LEADING_NUMBER = re.compile(r"[-+\u2212]?\$?\s*\d(?:[\d,]*\d)?(?:\.\d+)?(?:\s*/\s*\d+)?")
_R1 = re.compile(r"\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*", re.DOTALL)
_R1_OPENED = re.compile(r"(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*", re.DOTALL)
_ANY_TAG = re.compile(r"</?(?:think|answer)>")
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_LATEX_FRAC = re.compile(r"([+-]?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}")
_SLASH_FRAC = re.compile(r"([^/]+)/([^/]+)")


def _last_boxed(text: str) -> Optional[str]:
    """Content of the last \\boxed{...}, braces balanced; None if there is none or it never closes."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = start + len("\\boxed")
    while i < len(text) and text[i].isspace():
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def extract_answer(text: Any) -> Optional[str]:
    """The final answer in a completion: the last <answer>...</answer>, else gsm8k's `#### N`, else the
    last \\boxed{...}. A \\boxed{} inside the answer tags is unwrapped. None when there is none."""
    if not isinstance(text, str):
        return None
    tagged = _ANSWER_TAG.findall(text)
    if tagged:
        inner = tagged[-1]
        boxed = _last_boxed(inner)
        return (boxed if boxed is not None else inner).strip()
    marked = _GSM8K_ANSWER.findall(text)
    if marked:
        number = _LEADING_NUMBER.match(marked[-1])
        return (number[0] if number else marked[-1]).strip()
    boxed = _last_boxed(text)
    return boxed.strip() if boxed is not None else None


def _exact_number(s: str) -> Optional[Fraction]:
    # Exact rationals, so that 3/4 == 0.75 holds and large sums that differ in one digit never compare equal.
    s = s.strip().replace("\u2212", "-").replace("\\$", "").replace("$", "")
    s = s.strip().rstrip(".").removesuffix("%").strip()
    if not s:
        return None
    frac = _LATEX_FRAC.fullmatch(s)
    if frac:
        s = f"{frac[1]}{frac[2]}/{frac[3]}"
    slash = _SLASH_FRAC.fullmatch(s)
    if slash:
        num, den = _exact_number(slash[1]), _exact_number(slash[2])
        if num is None or den is None or den == 0:
            return None
        return num / den
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if _DECIMAL.fullmatch(s):
        return Fraction(s)
    return None


def parse_number(s: Any) -> Optional[float]:
    """A number written the ways answers are written: `1,000`, `$5`, ` 5. `, `-3`, `5.0`, `3/4`, `\\frac{3}{4}`,
    `50%` (read as 50). None when `s` is not one."""
    if isinstance(s, bool):
        return None
    if isinstance(s, (int, float)):
        return float(s)
    if not isinstance(s, str):
        return None
    value = _exact_number(s)
    return None if value is None else float(value)


def _normalise_text(s: str) -> str:
    return " ".join(s.casefold().split()).rstrip(".").strip()


def answers_match(predicted: str, reference: str) -> bool:
    """Numeric equality when both parse as numbers, else equality of case- and whitespace-normalised text."""
    p, r = _exact_number(predicted), _exact_number(reference)
    if r is not None:
        return p is not None and p == r
    return _normalise_text(predicted) == _normalise_text(reference)


def _reference_answer(gold: Any) -> Optional[str]:
    """The row's `answer`: a plain value, or a full solution ending in `#### N` / \\boxed{N}. None when absent."""
    if gold is None or isinstance(gold, bool):
        return None
    if isinstance(gold, (int, float)):
        return str(gold)
    if not isinstance(gold, str):
        return None
    found = extract_answer(gold)
    ref = found if found is not None else gold.strip()
    return ref or None


def completion_text(completion: Any, index: int = 0) -> str:
    """A completion as text: the string itself, or the contents of a chat completion's messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict) and isinstance(completion.get("content"), str):
        return completion["content"]
    if isinstance(completion, (list, tuple)) and all(
        isinstance(m, dict) and isinstance(m.get("content"), str) for m in completion
    ):
        return "\n".join(m["content"] for m in completion)
    raise RewardError(
        f"completion {index} is a {type(completion).__name__}; expected a string or a list of "
        f'{{"role": ..., "content": str}} messages'
    )


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[-1], dict):
        content = prompt[-1].get("content")
        return content if isinstance(content, str) else ""
    return ""


def check_columns(func_names: Iterable[str], columns: Iterable[str], source: str) -> None:
    """Raise DataError, naming `source` (the data file or task), when a reward in `func_names` (reward.funcs) needs
    a column that `columns` (those of the loaded rows) lacks. Rewards not in REQUIRED_COLUMNS are not checked."""
    present = list(columns)
    missing = [(name, column, meaning) for name in dict.fromkeys(func_names)
               for column, meaning in REQUIRED_COLUMNS.get(name, {}).items() if column not in present]
    if not missing:
        return
    needs = "; ".join(f"reward `{name}` needs column `{column}` ({meaning})" for name, column, meaning in missing)
    mapping = ", ".join(f"{column}: <your column>" for column in dict.fromkeys(column for _, column, _ in missing))
    rewards = ", ".join(dict.fromkeys(name for name, _, _ in missing))
    raise DataError(f"{source}: {needs}, which the rows do not have; columns: {', '.join(present) or 'none'}. Map "
                    f"yours with data.columns={{{mapping}}} or drop {rewards} from reward.funcs")


def _column(columns: dict, name: str, n: int, reward: str) -> list:
    if name not in columns:
        present = ", ".join(sorted(columns)) or "none"
        raise RewardError(
            f"the {reward} reward needs an `{name}` column in the data; columns passed: {present}"
        )
    values = list(columns[name])
    if len(values) != n:
        raise RewardError(f"the {reward} reward got {n} completions but {len(values)} `{name}` values")
    return values


@REWARD_FUNCS.register("accuracy")
def accuracy_reward(prompts: list, completions: list, **columns: Any) -> list[Optional[float]]:
    """1.0 when the completion's final answer (extract_answer) equals the row's `answer`, else 0.0.

    Numbers compare exactly as rationals (`1,000` == `1000`, `5.0` == `5`, `3/4` == `0.75`); other answers as
    normalised text. The `answer` column may be a plain value or a gsm8k solution ending in `#### N`.
    None for rows without an answer.
    """
    answers = _column(columns, "answer", len(completions), "accuracy")
    rewards: list[Optional[float]] = []
    for i, (completion, gold) in enumerate(zip(completions, answers)):
        reference = _reference_answer(gold)
        if reference is None:
            rewards.append(None)
            continue
        predicted = extract_answer(completion_text(completion, i))
        rewards.append(1.0 if predicted is not None and answers_match(predicted, reference) else 0.0)
    return rewards


def has_r1_format(completion: str, think_opened: bool = False) -> bool:
    """Exactly `<think>...</think><answer>...</answer>` with only whitespace around and between the blocks
    and no stray tags inside them. think_opened: the prompt already opened `<think>`, so the completion
    starts inside the think block."""
    match = (_R1_OPENED if think_opened else _R1).fullmatch(completion)
    return bool(match) and not _ANY_TAG.search(match["think"]) and not _ANY_TAG.search(match["answer"])


@REWARD_FUNCS.register("format")
def format_reward(prompts: Optional[list], completions: list, **columns: Any) -> list[float]:
    """1.0 for completions in DeepSeek-R1's `<think>...</think><answer>...</answer>` shape, else 0.0.

    A prompt ending in `<think>` (as R1-style templates emit) counts as an opened think block.
    """
    if prompts is None:
        prompts = [""] * len(completions)
    if len(prompts) != len(completions):
        raise RewardError(f"the format reward got {len(completions)} completions but {len(prompts)} prompts")
    return [
        1.0 if has_r1_format(completion_text(c, i), _prompt_text(p).rstrip().endswith("<think>")) else 0.0
        for i, (p, c) in enumerate(zip(prompts, completions))
    ]


@REWARD_FUNCS.register("length")
def length_reward(prompts: Optional[list], completions: list, **columns: Any) -> list[float]:
    """Kimi k1.5's length reward (arXiv:2501.12599, Sec. 2.3.3): among the completions of one prompt, shorter
    correct ones earn more and longer ones lose, relative to each other rather than to a fixed length.

    With `L` a completion's length in characters and `min`/`max` over the completions of the same prompt,
    `lam = 0.5 - (L - min) / (max - min)`; the reward is `lam` for a correct completion (the accuracy reward's
    check against the row's `answer`) and `min(0, lam)` otherwise, so a wrong answer never gains by being short.
    Without an `answer` column every completion counts as not known to be correct: a pure penalty in [-0.5, 0]
    on the longer ones. All 0.0 when a prompt's completions are equally long (or it has only one).

    Why this shape: it needs no target length (any fixed one would suit some tasks and not others), it is bounded
    in [-0.5, 0.5], so with a weight below 1 it never outweighs answering correctly, and it leaves hard limits to
    reward.overlong_buffer (DAPO's penalty near rollout.max_new_tokens). Characters stand in for tokens (reward
    functions see text); the min-max scaling makes the unit nearly irrelevant. Completions are grouped by
    identical prompt, as GRPO's group of one prompt is.
    """
    n = len(completions)
    prompts = [""] * n if prompts is None else prompts
    if len(prompts) != n:
        raise RewardError(f"the length reward got {n} completions but {len(prompts)} prompts")
    lengths = [len(completion_text(c, i)) for i, c in enumerate(completions)]
    correct = [v == 1.0 for v in accuracy_reward(prompts, completions, **columns)] if "answer" in columns \
        else [False] * n
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p if isinstance(p, str) else repr(p), []).append(i)  # chat prompts are lists: unhashable
    rewards = [0.0] * n
    for members in groups.values():
        shortest, longest = min(lengths[i] for i in members), max(lengths[i] for i in members)
        if longest == shortest:
            continue
        for i in members:
            lam = 0.5 - (lengths[i] - shortest) / (longest - shortest)
            rewards[i] = lam if correct[i] else min(0.0, lam)
    return rewards
