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
import rlhf.rewards.code  # noqa: F401  (registers `code`)
from rlhf.rewards.code import StdioTest, code_reward, extract_code, parse_tests, score_code
from rlhf.rewards.sandbox import CodeSandbox, SandboxError, SandboxResult

__all__ = [
    "REWARD_FUNCS",
    "CodeSandbox",
    "SandboxError",
    "SandboxResult",
    "StdioTest",
    "accuracy_reward",
    "answers_match",
    "code_reward",
    "completion_text",
    "extract_answer",
    "extract_code",
    "format_reward",
    "has_r1_format",
    "parse_number",
    "parse_tests",
    "score_code",
]
