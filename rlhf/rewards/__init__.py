"""Reward functions, chosen by name from REWARD_FUNCS (TRL's signature: f(prompts, completions, **columns))."""

from rlhf.rewards.rules import (
    REWARD_FUNCS,
    accuracy_reward,
    answers_match,
    completion_text,
    extract_answer,
    format_reward,
    has_r1_format,
    parse_number,
)

__all__ = [
    "REWARD_FUNCS",
    "accuracy_reward",
    "answers_match",
    "completion_text",
    "extract_answer",
    "format_reward",
    "has_r1_format",
    "parse_number",
]
