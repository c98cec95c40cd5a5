"""Row layouts users bring -> the canonical columns each kind of data is read through.

Canonical columns by kind:
- sft:        prompt, completion                  (+ answer where the layout has one)
- prompt:     prompt                              (+ answer, solution, tests, and every column the layout
              does not use)
- preference: prompt, chosen, rejected (+ margin) or, for rankings, prompt, responses (best first, >= 2)

`prompt` is a string or, for chat data, a list of {role, content} messages (rendered later with the
tokenizer's chat template). completion, chosen, rejected and each of responses are always strings: the
assistant's reply that follows the prompt. Columns outside the layout pass through unchanged.

Layouts (data.format): prompt_completion, messages, gsm8k, prompt, preference, hh_rlhf, ranked, or
auto (the first layout whose columns are all present, in KIND_FORMATS order). Row indices in errors
count from 0.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from datasets import Dataset

from rlhf.errors import DataError

KINDS = ("sft", "prompt", "preference")

LAYOUT_COLUMNS: dict[str, tuple[str, ...]] = {
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "gsm8k": ("question", "answer"),
    "prompt": ("prompt",),
    "preference": ("prompt", "chosen", "rejected"),
    "hh_rlhf": ("chosen", "rejected"),
    "ranked": ("prompt", "responses"),
}

# The layouts each kind accepts, in the order `auto` tries them. SFT on preference data learns the
# chosen (or best-ranked) response and RL takes the prompts of any layout, so one data config can feed
# every stage of `rlhf pipeline`.
KIND_FORMATS: dict[str, tuple[str, ...]] = {
    "sft": ("prompt_completion", "messages", "gsm8k", "preference", "hh_rlhf", "ranked"),
    "prompt": ("prompt", "gsm8k", "messages", "hh_rlhf", "prompt_completion", "preference", "ranked"),
    "preference": ("ranked", "preference", "hh_rlhf"),
}

CANONICAL_COLUMNS: dict[str, tuple[str, ...]] = {
    "sft": ("prompt", "completion"),
    "prompt": ("prompt",),
    "preference": ("prompt", "chosen", "rejected"),
}

_EXPECTED = {
    "sft": "prompt+completion, messages, question+answer (gsm8k), prompt+chosen+rejected or chosen+rejected "
    "(trained on chosen), or prompt+responses",
    "prompt": "prompt, question+answer (gsm8k), messages, or chosen+rejected conversations (hh-rlhf)",
    "preference": "prompt+chosen+rejected, chosen+rejected full conversations (hh-rlhf), "
    "or prompt+responses (ranked)",
}

_MAPPABLE = (
    "prompt", "completion", "messages", "question", "answer", "solution", "chosen", "rejected", "margin", "responses",
    "tests",
)
_CONSUMED = {
    "prompt_completion": {"prompt", "completion"},
    "messages": {"messages"},
    "gsm8k": {"question", "answer"},
    "prompt": {"prompt"},
    "preference": {"prompt", "chosen", "rejected", "margin"},
    "hh_rlhf": {"prompt", "chosen", "rejected", "margin"},
    "ranked": {"prompt", "responses"},
}
HH_ASSISTANT = "\n\nAssistant:"

Rows = list[dict]


def _names(columns: Iterable[str]) -> str:
    return ", ".join(columns) or "none"


def _describe(value: Any) -> str:
    if value is None:
        return "missing (null)"
    if isinstance(value, list):
        return "an empty list" if not value else "a list that is not chat messages ({role, content} objects)"
    name = type(value).__name__
    text = repr(value)
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name} ({text if len(text) <= 40 else text[:37] + '...'})"


def is_messages(value: Any) -> bool:
    """A non-empty list of chat messages: dicts with string `role` and `content`."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value
        )
    )


def _text_or_messages(row: dict, column: str, i: int, source: str) -> Union[str, list]:
    value = row.get(column)
    if isinstance(value, str) or is_messages(value):
        return value
    raise DataError(
        f"{source}: column {column!r} is {_describe(value)} at row {i}; expected a string or a list of chat "
        f"messages ({{role, content}})"
    )


def _text(row: dict, column: str, i: int, source: str) -> str:
    value = row.get(column)
    if isinstance(value, str):
        return value
    raise DataError(f"{source}: column {column!r} is {_describe(value)} at row {i}; expected a string")


def _reply(value: Any, column: str, i: int, source: str) -> str:
    """A response as text: a string, or a chat reply of exactly one assistant message (its content)."""
    if isinstance(value, str):
        return value
    if is_messages(value) and len(value) == 1 and value[0]["role"] == "assistant":
        return value[0]["content"]
    if is_messages(value):
        roles = ", ".join(m["role"] for m in value)
        raise DataError(
            f"{source}: column {column!r} at row {i} holds messages ({roles}) after the prompt; expected one "
            f"assistant reply"
        )
    raise DataError(
        f"{source}: column {column!r} is {_describe(value)} at row {i}; expected a string or a one-message "
        f"assistant reply"
    )


def _shared_messages(a: list, b: list) -> int:
    """Length of the common leading messages, leaving each side at least one message of its own."""
    n = 0
    while n < min(len(a), len(b)) - 1 and a[n] == b[n]:
        n += 1
    return n


def split_shared_prompt(chosen: Any, rejected: Any, i: int = 0, source: str = "data") -> tuple[Any, Any, Any]:
    """Full conversations -> (prompt, chosen, rejected).

    Strings (hh-rlhf): the prompt is the longest common prefix cut after its last "\\n\\nAssistant:".
    Message lists: the prompt is the shared leading messages; chosen and rejected are what follows them
    (message lists; formats.to_canonical reduces them to the reply text).
    """
    if isinstance(chosen, str) and isinstance(rejected, str):
        common = os.path.commonprefix([chosen, rejected])
        cut = common.rfind(HH_ASSISTANT)
        if cut < 0:
            raise DataError(
                f"{source}: row {i}: chosen and rejected share no prefix ending in {HH_ASSISTANT!r}, so no prompt "
                f"can be split off; expected hh-rlhf conversations ('\\n\\nHuman: ...\\n\\nAssistant: ...') or a "
                f"prompt column"
            )
        cut += len(HH_ASSISTANT)
        return chosen[:cut], chosen[cut:], rejected[cut:]
    if is_messages(chosen) and is_messages(rejected):
        n = _shared_messages(chosen, rejected)
        if n == 0:
            raise DataError(
                f"{source}: row {i}: chosen and rejected conversations share no leading messages to use as the "
                f"prompt; add a prompt column"
            )
        return chosen[:n], chosen[n:], rejected[n:]
    bad = "chosen" if not (isinstance(chosen, str) or is_messages(chosen)) else "rejected"
    value = chosen if bad == "chosen" else rejected
    if isinstance(value, str) or is_messages(value):
        raise DataError(f"{source}: row {i}: chosen and rejected mix a string and a message list")
    raise DataError(
        f"{source}: column {bad!r} is {_describe(value)} at row {i}; expected a full conversation (a string or a "
        f"list of chat messages)"
    )


def _final_answer(value: Any, i: int, source: str) -> tuple[str, str]:
    """gsm8k's `answer`: (the number after the last ####, the full solution). Plain answers are kept as is."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(
            f"{source}: column 'answer' is {_describe(value)} at row {i}; expected a string like '... #### 72'"
        )
    text = str(value)
    final = text.rsplit("####", 1)[-1].strip() if "####" in text else text.strip()
    return final, text


def _margin(value: Any, i: int, source: str) -> float:
    if not isinstance(value, bool) and isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise DataError(f"{source}: column 'margin' is {_describe(value)} at row {i}; expected a number")


def _parse_row(row: dict, i: int, fmt: str, kind: str, source: str) -> dict:
    """The canonical fields one row of layout `fmt` provides (prompt, completion, chosen, ...)."""
    if fmt in ("prompt_completion", "prompt"):
        prompt = _text_or_messages(row, "prompt", i, source)
        if fmt == "prompt":
            return {"prompt": prompt}
        return {"prompt": prompt, "completion": _reply(row.get("completion"), "completion", i, source)}
    if fmt == "messages":
        messages = row.get("messages")
        if not is_messages(messages):
            raise DataError(
                f"{source}: column 'messages' is {_describe(messages)} at row {i}; expected a list of chat messages "
                f"({{role, content}})"
            )
        last = max((k for k, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if kind == "prompt":
            # A conversation that ends with the assistant's turn: that turn is what the policy will write.
            cut = len(messages) - 1 if messages[-1]["role"] == "assistant" else len(messages)
            if cut == 0:
                raise DataError(f"{source}: row {i}: `messages` holds only an assistant message, no prompt")
            return {"prompt": messages[:cut]}
        if last is None:
            raise DataError(f"{source}: row {i}: `messages` has no assistant message to learn from")
        if last == 0:
            raise DataError(
                f"{source}: row {i}: `messages` has nothing before the last assistant message to use as the prompt"
            )
        return {"prompt": messages[:last], "completion": messages[last]["content"]}
    if fmt == "gsm8k":
        question = _text(row, "question", i, source)
        final, full = _final_answer(row.get("answer"), i, source)
        return {"prompt": question, "completion": full, "answer": final, "solution": full}
    if fmt in ("preference", "hh_rlhf"):
        chosen, rejected = row.get("chosen"), row.get("rejected")
        if fmt == "hh_rlhf":
            prompt, chosen, rejected = split_shared_prompt(chosen, rejected, i, source)
        else:
            prompt = _text_or_messages(row, "prompt", i, source)
            if is_messages(chosen) and is_messages(rejected) and _shared_messages(chosen, rejected):
                # Full conversations (UltraFeedback-style): their shared turns are the prompt.
                prompt, chosen, rejected = split_shared_prompt(chosen, rejected, i, source)
        fields = {
            "prompt": prompt,
            "chosen": _reply(chosen, "chosen", i, source),
            "rejected": _reply(rejected, "rejected", i, source),
        }
        if row.get("margin") is not None:
            fields["margin"] = _margin(row["margin"], i, source)
        return fields
    if fmt == "ranked":
        prompt = _text_or_messages(row, "prompt", i, source)
        responses = row.get("responses")
        if not isinstance(responses, list) or len(responses) < 2:
            found = f"has {len(responses)} item(s)" if isinstance(responses, list) else f"is {_describe(responses)}"
            raise DataError(
                f"{source}: column 'responses' {found} at row {i}; expected a list of at least 2 responses, best first"
            )
        replies = [_reply(r, f"responses[{k}]", i, source) for k, r in enumerate(responses)]
        return {"prompt": prompt, "responses": replies}
    raise AssertionError(f"unhandled layout {fmt}")


def _project(fields: dict, fmt: str, kind: str) -> dict:
    """Keep the fields `kind` reads: SFT learns chosen / the best response; RL keeps only the prompt side."""
    if kind == "sft":
        if "completion" not in fields:
            fields["completion"] = fields["chosen"] if "chosen" in fields else fields["responses"][0]
        keep = ("prompt", "completion", "answer")
    elif kind == "prompt":
        keep = ("prompt", "answer", "solution") + (("completion",) if fmt == "prompt_completion" else ())
    else:
        keep = ("prompt", "chosen", "rejected", "margin", "responses", "answer", "solution")
    return {k: v for k, v in fields.items() if k in keep}


def _closest_layout(present: set, kind: str) -> tuple[str, list[str]]:
    best = max(KIND_FORMATS[kind], key=lambda f: len(present & set(LAYOUT_COLUMNS[f])))
    return best, [c for c in LAYOUT_COLUMNS[best] if c not in present]


def infer_format(columns: Iterable[str], kind: str, source: str = "data") -> str:
    """The layout `auto` picks for these columns: the first of KIND_FORMATS[kind] whose columns are present."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    columns = list(columns)
    present = set(columns)
    for fmt in KIND_FORMATS[kind]:
        if present >= set(LAYOUT_COLUMNS[fmt]):
            return fmt
    closest, missing = _closest_layout(present, kind)
    raise DataError(
        f"{source}: missing column(s) {_names(missing)} for {kind} data (closest layout: {closest}); columns present: "
        f"{_names(columns)}; expected {_EXPECTED[kind]}. Map other names with data.columns, e.g. "
        f"data.columns={{{missing[0] if missing else 'prompt'}: <your column>}}"
    )


def resolve_format(fmt: str, kind: str, columns: Sequence[str], source: str = "data") -> str:
    """Validate an explicit data.format against `kind` and the columns present, or infer it for `auto`."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if fmt == "auto":
        return infer_format(columns, kind, source)
    if fmt not in LAYOUT_COLUMNS:
        raise DataError(f"unknown data.format={fmt!r}; valid: auto, {', '.join(LAYOUT_COLUMNS)}")
    if fmt not in KIND_FORMATS[kind]:
        raise DataError(
            f"data.format={fmt} cannot provide {kind} data (it has no {', '.join(CANONICAL_COLUMNS[kind])}); "
            f"use one of: auto, {', '.join(KIND_FORMATS[kind])}"
        )
    missing = [c for c in LAYOUT_COLUMNS[fmt] if c not in columns]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {_names(missing)} for data.format={fmt} ({kind} data); columns present: "
            f"{_names(columns)}; expected {_EXPECTED[kind]}. Map other names with data.columns"
        )
    return fmt


def rename_columns(
    rows: Rows, present: list[str], columns: Optional[Mapping[str, str]], source: str
) -> tuple[Rows, list[str]]:
    """Apply data.columns (canonical name -> name in the data); a mapped-over canonical column is replaced."""
    mapping = {str(k): str(v) for k, v in (columns or {}).items()}
    for canonical, original in mapping.items():
        if canonical not in _MAPPABLE:
            raise DataError(
                f"data.columns has unknown key {canonical!r}; keys are canonical names: {', '.join(_MAPPABLE)}"
            )
        if original not in present:
            raise DataError(
                f"{source}: data.columns maps {canonical!r} to column {original!r}, which is not in the data; "
                f"columns present: {_names(present)}"
            )
    if not mapping:
        return rows, present
    gone = set(mapping) | set(mapping.values())
    renamed = [
        {**{k: v for k, v in row.items() if k not in gone}, **{c: row.get(o) for c, o in mapping.items()}}
        for row in rows
    ]
    return renamed, [c for c in present if c not in gone] + list(mapping)


def _kind_of(value: Any) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}.get(type(value), type(value).__name__)


def rows_to_dataset(rows: Rows, source: str, columns: Sequence[str] = ()) -> Dataset:
    """A Dataset from row dicts (keys may differ between rows); a column must hold one type throughout."""
    names: dict[str, None] = dict.fromkeys(columns)
    first: dict[str, tuple[str, int]] = {}
    for i, row in enumerate(rows):
        for key, value in row.items():
            names.setdefault(key)
            kind = _kind_of(value)
            if kind is None:
                continue
            seen = first.setdefault(key, (kind, i))
            if seen[0] != kind:
                raise DataError(
                    f"{source}: column {key!r} holds a {kind} at row {i} but a {seen[0]} at row {seen[1]}; "
                    f"a column must have one type"
                )
    if not rows:
        return Dataset.from_dict({name: [] for name in names})
    try:
        return Dataset.from_dict({name: [row.get(name) for row in rows] for name in names})
    except Exception as e:  # pyarrow's errors for nested values of differing shapes
        raise DataError(f"{source}: cannot build a table from the rows: {e}") from e


def canonical_rows(
    rows: Rows,
    present: list[str],
    fmt: str,
    kind: str,
    columns: Optional[Mapping[str, str]] = None,
    source: str = "data",
) -> tuple[Rows, str]:
    """Rename, resolve the layout, and convert every row; returns (canonical rows, resolved layout)."""
    if not rows:
        raise DataError(f"{source}: no rows")
    rows, present = rename_columns(rows, present, columns, source)
    fmt = resolve_format(fmt, kind, present, source)
    consumed = _CONSUMED[fmt]
    out = []
    for i, row in enumerate(rows):
        canonical = _project(_parse_row(row, i, fmt, kind, source), fmt, kind)
        if isinstance(row.get("answer"), (int, float)) and not isinstance(row.get("answer"), bool):
            # Reward functions compare answers as text; one type keeps the Arrow column valid.
            canonical.setdefault("answer", str(row["answer"]))
        passthrough = {k: v for k, v in row.items() if k not in consumed and k not in canonical}
        out.append({**canonical, **passthrough})
    return out, fmt


def to_canonical(
    ds: Union[Dataset, Rows],
    fmt: str,
    kind: str,
    columns: Optional[Mapping[str, str]] = None,
    source: str = "data",
) -> Dataset:
    """Map a dataset (or a list of row dicts) of any supported layout onto the canonical columns of `kind`.

    fmt: data.format (auto or a layout name). columns: data.columns, canonical name -> column in the data.
    source: the file or dataset name, used in error messages.
    """
    if isinstance(ds, Dataset):
        rows, present = ds.to_list(), list(ds.column_names)
    else:
        rows = list(ds)
        present = list(dict.fromkeys(k for row in rows for k in row))
    out, _ = canonical_rows(rows, present, fmt, kind, columns, source)
    return rows_to_dataset(out, source)


def _is_empty_response(value: Any) -> bool:
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list):
        return not value or all(not str(m.get("content") or "").strip() for m in value if isinstance(m, dict))
    return value is None


def _normalised(value: Any) -> Any:
    return value.strip() if isinstance(value, str) else value


def _invalid_reason(row: dict) -> Optional[str]:
    if "responses" in row and row["responses"] is not None:
        responses = row["responses"]
        if len(responses) < 2:
            return "fewer than 2 responses"
        for k, response in enumerate(responses):
            if _is_empty_response(response):
                return f"response {k} is empty"
        for k in range(len(responses)):
            for j in range(k):
                if _normalised(responses[j]) == _normalised(responses[k]):
                    return f"responses {j} and {k} are identical"
        return None
    for side in ("chosen", "rejected"):
        if _is_empty_response(row.get(side)):
            return f"{side} is empty"
    if _normalised(row["chosen"]) == _normalised(row["rejected"]):
        return "chosen and rejected are identical"
    return None


def drop_invalid_preferences(
    ds: Dataset, on_invalid: str = "drop", source: str = "preference data"
) -> tuple[Dataset, int]:
    """Remove pairs that teach nothing (identical chosen and rejected, an empty response).

    on_invalid: "drop" returns (the remaining rows, how many were dropped); "error" raises DataError naming
    the first invalid row. Dropping every row is an error either way.
    """
    if on_invalid not in ("drop", "error"):
        raise ValueError(f"on_invalid must be 'drop' or 'error', got {on_invalid!r}")
    keep, first_bad = [], None
    for i, row in enumerate(ds.to_list()):
        reason = _invalid_reason(row)
        if reason is None:
            keep.append(i)
            continue
        if on_invalid == "error":
            raise DataError(f"{source}: preference row {i}: {reason}; fix or remove the row")
        first_bad = first_bad or f"row {i}: {reason}"
    dropped = len(ds) - len(keep)
    if len(ds) and not keep:
        raise DataError(f"{source}: all {dropped} preference rows are invalid (first: {first_bad})")
    return (ds.select(keep) if dropped else ds), dropped
