"""Data: built-in tasks, local and hub loading, and the canonical columns every stage reads."""

from rlhf.data.formats import (
    CANONICAL_COLUMNS,
    KIND_FORMATS,
    KINDS,
    LAYOUT_COLUMNS,
    drop_invalid_preferences,
    infer_format,
    is_messages,
    resolve_format,
    split_shared_prompt,
    to_canonical,
)
from rlhf.data.loading import BUILTIN_TASKS, FILE_TYPES, load_rows, read_rows
from rlhf.data.tasks.arithmetic import (
    arithmetic_demonstrations,
    arithmetic_preferences,
    arithmetic_problems,
    has_carry,
    in_test_split,
    solution,
)

__all__ = [
    "BUILTIN_TASKS",
    "CANONICAL_COLUMNS",
    "FILE_TYPES",
    "KIND_FORMATS",
    "KINDS",
    "LAYOUT_COLUMNS",
    "arithmetic_demonstrations",
    "arithmetic_preferences",
    "arithmetic_problems",
    "drop_invalid_preferences",
    "has_carry",
    "in_test_split",
    "infer_format",
    "is_messages",
    "load_rows",
    "read_rows",
    "resolve_format",
    "solution",
    "split_shared_prompt",
    "to_canonical",
]
