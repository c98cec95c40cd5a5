"""Load the rows a stage trains and evaluates on: a built-in task, a local file or directory, or a hub dataset.

Local files are parsed here rather than by `datasets.load_dataset` so that a bad file fails with its
name and the line, row or byte at fault. Every path ends in formats.to_canonical's columns.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
from pathlib import Path
from typing import Any, Callable, Optional

import datasets
from datasets import Dataset

from rlhf.data.formats import KINDS, Rows, canonical_rows, rows_to_dataset
from rlhf.data.tasks.arithmetic import arithmetic_demonstrations, arithmetic_preferences, arithmetic_problems
from rlhf.errors import DataError

# In a directory holding several of these, the first present wins (hub snapshots keep .json metadata
# beside their .parquet shards).
FILE_TYPES = (".parquet", ".jsonl", ".json", ".csv")
SPLIT_NAMES = ("train", "test", "validation", "valid", "eval", "dev")
_UTF8_BOM = b"\xef\xbb\xbf"
# data.eval_size left at its default is a wish, not a demand (see held_out_size).
AUTO_EVAL_SIZE = 200

BUILTIN_TASKS: dict[str, dict[str, Callable[[Any, str, int], list[dict]]]] = {
    "arithmetic": {
        "sft": arithmetic_demonstrations,
        "prompt": arithmetic_problems,
        "preference": arithmetic_preferences,
    },
}
_BUILTIN_COLUMNS = {
    "sft": ("prompt", "completion", "answer"),
    "prompt": ("prompt", "answer"),
    "preference": ("prompt", "chosen", "rejected", "answer"),
}


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    skip = len(_UTF8_BOM) if raw.startswith(_UTF8_BOM) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = e.start + skip
        line = raw.count(b"\n", 0, offset) + 1
        raise DataError(
            f"{path}: not valid UTF-8 at byte {offset} (line {line}); re-encode the file as UTF-8, e.g. "
            f"`iconv -f latin1 -t utf-8 {path.name} > utf8_{path.name}`"
        ) from e


def _parse_jsonl(text: str, path: Path) -> Rows:
    rows = []
    # split("\n"), not splitlines(): JSON strings may legally hold U+2028 and other line separators.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}: line {lineno}: invalid JSON ({e.msg} at column {e.colno}); the file may be truncated or "
                f"hold a partly written line"
            ) from e
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {lineno}: expected a JSON object per line, got {type(row).__name__}")
        rows.append(row)
    return rows


def _parse_json(text: str, path: Path) -> Rows:
    """A list of row objects, {"<name>": [rows]}, an object of equal-length column lists, or JSON Lines."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines saved as .json, which `datasets` accepts too
            return _parse_jsonl(text, path)
        raise DataError(
            f"{path}: invalid JSON at line {e.lineno}, column {e.colno} ({e.msg}); the file may be truncated"
        ) from e
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(data) == 1 and lists and all(isinstance(r, dict) for r in lists[0]):
            data = lists[0]
        elif data and len(lists) == len(data) and len({len(v) for v in lists}) == 1:
            data = [dict(zip(data, values)) for values in zip(*data.values())]
        else:
            raise DataError(f"{path}: expected a list of row objects, or an object of equal-length column lists")
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of row objects, got a JSON {type(data).__name__}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}: item {i} is a {type(row).__name__}, expected an object (one row)")
    return data


def _read_csv(text: str, path: Path) -> Rows:
    import pandas as pd

    try:
        # CSV cells are text: reading them as such keeps "07" and "72" as written for prompts and answers.
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except Exception as e:
        raise DataError(f"{path}: cannot parse as CSV ({e})") from e
    return frame.to_dict("records")


def _read_parquet(path: Path) -> Rows:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:
        raise DataError(f"{path}: cannot read as parquet ({type(e).__name__}: {e})") from e


def read_rows(path: Path) -> tuple[Rows, list[str]]:
    """Rows of one local file, and its columns in order (the union over rows for JSON)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        rows = _read_parquet(path)
    elif suffix == ".csv":
        rows = _read_csv(_read_text(path), path)
    elif suffix == ".jsonl":
        rows = _parse_jsonl(_read_text(path), path)
    elif suffix == ".json":
        rows = _parse_json(_read_text(path), path)
    else:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}; use {', '.join(FILE_TYPES)}")
    return rows, list(dict.fromkeys(k for row in rows for k in row))


def _in_split(path: Path, root: Path, split: str) -> bool:
    """train.jsonl, train-00000-of-00002.parquet and train/part.csv all belong to split "train"."""
    rel = path.relative_to(root)
    names = [*rel.parts[:-1], rel.name.split(".")[0]]
    pattern = re.compile(rf"{re.escape(split)}(?:[-_].*)?", re.IGNORECASE)
    return any(pattern.fullmatch(name) for name in names)


def _split_files(root: Path, split: str) -> list[Path]:
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in FILE_TYPES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise DataError(f"{root}: no {', '.join(FILE_TYPES)} files in this directory")
    suffix = next(s for s in FILE_TYPES if any(p.suffix.lower() == s for p in files))
    files = [p for p in files if p.suffix.lower() == suffix]
    splits = [s for s in dict.fromkeys((*SPLIT_NAMES, split)) if any(_in_split(p, root, s) for p in files)]
    if not splits:
        if split != "train":
            raise DataError(
                f"{root}: no file names a split (train.*, test.*, ...), so the directory is one 'train' split and "
                f"has no {split!r} split; set data.eval_split=null to hold out data.eval_size rows instead"
            )
        return files
    chosen = [p for p in files if _in_split(p, root, split)]
    if not chosen:
        raise DataError(f"{root}: no {suffix} files for split {split!r}; splits found: {', '.join(splits)}")
    return chosen


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).suffix.lower() in FILE_TYPES


def _load_hub(cfg: Any, split: str) -> tuple[Rows, list[str], str]:
    source = cfg.path if cfg.subset is None else f"{cfg.path} ({cfg.subset})"
    try:
        ds = datasets.load_dataset(cfg.path, cfg.subset, split=split)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"data.path={cfg.path!r} is neither a local file or directory nor a loadable hub dataset "
            f"(subset={cfg.subset!r}, split={split!r}): {reason}"
        ) from e
    return ds.to_list(), list(ds.column_names), f"{source} [{split}]"


def _load_saved(root: Path, split: str) -> tuple[Rows, list[str], str]:
    """A directory written by Dataset(Dict).save_to_disk: its .json files are metadata, not rows."""
    try:
        saved = datasets.load_from_disk(str(root))
    except Exception as e:
        raise DataError(f"{root}: cannot load this save_to_disk directory ({type(e).__name__}: {e})") from e
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise DataError(f"{root}: no split {split!r}; splits found: {', '.join(saved)}")
        saved = saved[split]
    elif split != "train":
        raise DataError(
            f"{root}: a saved Dataset is one 'train' split and has no {split!r} split; set data.eval_split=null "
            f"to hold out data.eval_size rows"
        )
    return saved.to_list(), list(saved.column_names), f"{root} [{split}]"


def _load_split(cfg: Any, kind: str, split: str) -> Dataset:
    """One split of data.path, canonical for `kind`."""
    path = Path(str(cfg.path)).expanduser()
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        rows, present, source = _load_saved(path, split)
        converted, _ = canonical_rows(rows, present, cfg.format, kind, cfg.columns, source)
        return rows_to_dataset(converted, source)
    if path.is_file() or path.is_dir():
        if path.is_file():
            if split != "train":
                raise DataError(
                    f"{path}: a single file is one 'train' split and has no {split!r} split; set "
                    f"data.eval_split=null to hold out data.eval_size rows, or point data.path at a directory "
                    f"with train.* and {split}.* files"
                )
            files = [path]
        else:
            files = _split_files(path, split)
        out: Rows = []
        fmt = cfg.format
        for file in files:
            rows, present = read_rows(file)
            if not rows and len(files) > 1:
                continue
            converted, fmt = canonical_rows(rows, present, fmt, kind, cfg.columns, str(file))
            out.extend(converted)
        source = str(path if len(files) > 1 else files[0])
        if not out:
            raise DataError(f"{source}: no rows")
        return rows_to_dataset(out, source)
    if _looks_local(str(cfg.path)):
        raise DataError(f"data.path={cfg.path!r}: no such file or directory")
    rows, present, source = _load_hub(cfg, split)
    converted, _ = canonical_rows(rows, present, cfg.format, kind, cfg.columns, source)
    return rows_to_dataset(converted, source)


def _builtin(cfg: Any, kind: str, split: str, seed: int) -> Dataset:
    if cfg.task not in BUILTIN_TASKS:
        raise DataError(
            f"unknown built-in task data.task={cfg.task!r}; valid: {', '.join(BUILTIN_TASKS)} "
            f"(or set data.path to load a dataset)"
        )
    rows = BUILTIN_TASKS[cfg.task][kind](getattr(cfg, cfg.task), "train" if split == "train" else "test", seed)
    if split == "train" and not rows:
        raise DataError(f"built-in task {cfg.task!r}: no rows (data.{cfg.task}.num_train is 0)")
    return rows_to_dataset(rows, f"built-in task {cfg.task!r}", _BUILTIN_COLUMNS[kind])


def held_out_size(eval_size: Optional[int], rows: int, source: str) -> int:
    """How many of `rows` to hold out for evaluation when there is no eval split.

    data.eval_size=null (the default) adapts to the file: 10% of the rows, at least 1 and at most
    AUTO_EVAL_SIZE, none from a one-row file, so a small file trains on most of its rows. Any other value is taken
    as asked, and is an error only when it would leave no training rows."""
    if eval_size is None:
        return 0 if rows < 2 else min(AUTO_EVAL_SIZE, max(1, rows // 10))
    if eval_size <= 0:
        return 0
    if eval_size >= rows:
        raise DataError(
            f"{source}: data.eval_size={eval_size} would leave no training rows out of {rows}; lower "
            f"data.eval_size or set data.eval_split"
        )
    return eval_size


def load_rows(cfg: Any, kind: str, split: str, seed: int) -> Dataset:
    """The canonical rows (see rlhf.data.formats) of `kind` for `split`.

    cfg: a DataConfig. kind: "sft" (demonstrations), "prompt" (RL prompts) or "preference".
    split: "train" or "eval". Without data.path, the built-in task's train/test sets. Otherwise data.split
    for training; for eval, data.eval_split when set, else held_out_size rows held out from data.split by
    a shuffle seeded with `seed` (the training rows then exclude them, in their original order).
    A missing held-out set (data.eval_size=0, or num_eval=0 for a built-in task) is an empty Dataset
    with the training columns, never None.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if cfg.path is None:
        return _builtin(cfg, kind, split, seed)
    if split == "eval" and cfg.eval_split is not None:
        return _load_split(cfg, kind, cfg.eval_split)
    full = _load_split(cfg, kind, cfg.split)
    if cfg.eval_split is not None:
        return full
    size = held_out_size(cfg.eval_size, len(full), str(cfg.path))
    # Said once: on the training load (which every stage does first), by rank 0 (every rank loads the same rows).
    if split == "train" and cfg.eval_size is None and size != AUTO_EVAL_SIZE and os.environ.get("RANK", "0") == "0":
        print(f"{cfg.path}: holding out {size} of its {len(full)} rows for evaluation, training on {len(full) - size} "
              f"(data.eval_size=null adapts to the file: 10% of the rows, at least 1 of 2 or more, at most "
              f"{AUTO_EVAL_SIZE}; set another value to hold out exactly that many)", flush=True)
    if size == 0:
        return full if split == "train" else full.select([])
    held_out = set(random.Random(f"eval-holdout/{seed}").sample(range(len(full)), size))
    indices = sorted(held_out) if split == "eval" else [i for i in range(len(full)) if i not in held_out]
    return full.select(indices)

