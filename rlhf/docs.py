"""Generate docs/configuration.md from the structured configs' field docstrings (`make docs`)."""

from __future__ import annotations

import dataclasses
import enum
import inspect
import typing

from rlhf.config import STAGE_SCHEMAS, StageConfig, field_docs, group_options


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return ""
    if isinstance(value, list):
        return f"[{', '.join(map(str, value))}]"  # str(): a choice's value, where repr() gives <Enum.name: 'value'>
    return "null" if value is None else repr(value).replace("'", "") if isinstance(value, dict) else (
        str(value).lower() if isinstance(value, bool) else str(value))


def _type_name(kind: object) -> str:
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    origin = typing.get_origin(kind)
    if origin is typing.Union:
        return f"{_type_name(args[0])} or null"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return f"choice: {', '.join(m.value for m in kind)}"
    return "any" if kind is typing.Any else getattr(kind, "__name__", str(kind))


def _cell(text: str) -> str:
    """A docstring as one table cell: a line break would end the markdown row."""
    return " ".join(text.split())


def _section(cls: type, prefix: str, out: list[str], skip: frozenset[str] = frozenset()) -> None:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    nested = []
    rows = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            nested.append((kind, f"{prefix}{f.name}."))
            continue
        type_name = _type_name(kind)
        rows.append(f"| `{prefix}{f.name}` | {type_name} | `{_default(f)}` | {_cell(docs.get(f.name, ''))} |")
    if rows:
        title = prefix.rstrip(".") or "top level"
        out += [f"### `{title}`", ""]
        if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
            out += [inspect.cleandoc(cls.__doc__), ""]
        out += ["| key | type | default | meaning |", "| --- | --- | --- | --- |", *rows, ""]
    for kind, sub in nested:
        _section(kind, sub, out)


def render() -> str:
    out = ["# Configuration reference", "",
           "Generated from the structured configs in `rlhf/config.py` by `make docs`; a test checks it is current.",
           "Defaults below are the schema's; each stage's entry config (`conf/<stage>.yaml`) and the chosen group",
           "options may set other values: `rlhf <stage> --cfg job` prints the resolved config.", "",
           "## Config groups", "", "| group | options |", "| --- | --- |"]
    out += [f"| `{g}` | {', '.join(f'`{o}`' for o in opts)} |" for g, opts in group_options().items()]
    out += ["", "## Keys shared by every stage", ""]
    _section(StageConfig, "", out)
    shared = typing.get_type_hints(StageConfig)
    for stage, schema in STAGE_SCHEMAS.items():
        hints = typing.get_type_hints(schema)
        own = [f for f in dataclasses.fields(schema) if f.name not in shared]
        # A shared group a stage extends (the RL stages' trainer): the keys it adds, under the shared name.
        extended = [f for f in dataclasses.fields(schema) if f.name in shared and hints[f.name] is not shared[f.name]]
        if own or extended:
            out += [f"## `rlhf {stage.replace('_', '-')}`", ""]
            docs = field_docs(schema)
            for f in extended:
                base = {g.name for g in dataclasses.fields(shared[f.name])}
                _section(hints[f.name], f"{f.name}.", out, frozenset(base))
            plain = [f for f in own if not dataclasses.is_dataclass(hints[f.name])]
            if plain:
                out += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
                out += [f"| `{f.name}` | {_type_name(hints[f.name])} | `{_default(f)}` | {_cell(docs.get(f.name, ''))} |"
                        for f in plain]
                out.append("")
            for f in own:
                if dataclasses.is_dataclass(hints[f.name]):
                    _section(hints[f.name], f"{f.name}.", out)
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
