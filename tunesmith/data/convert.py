"""`data convert` and `data split`: spreadsheets / tables -> conversation JSONL, and a seeded random split.

- `convert_table(src, dst, *, input_col=None, output_col=None, system="", system_template=None, sheet=None)
   -> ConvertResult`: one `{"conversation": [{"system"?, "input", "output"}]}` line per row of a .xlsx / .xls /
  .csv / .tsv / .json / .jsonl / .parquet file (the tutorial's xlsx2json). Without column names the pairs
  input/output, question/answer, instruction/output, prompt/completion, query/response are tried
  (case-insensitive). Rows with an empty or whitespace-only input or output are dropped and counted.
- `split_records(src, train, test, *, ratio=0.7, seed=0) -> (n_train, n_test)`: random and reproducible;
  each part keeps the original order of its records; the output format follows each file's suffix
  (.jsonl lines or a .json array). `split_indices(n, ratio, *, seed)` is the rule itself.
Both write atomically (nothing half-written).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.data.conversation import Turn, conversation_to_json
from tunesmith.data.sources import iter_file
from tunesmith.data.templates import resolve_system
from tunesmith.errors import TunesmithError
from tunesmith.files import atomic_path, check_outputs

CONVERT_SUFFIXES = (".xlsx", ".xls", ".csv", ".tsv", ".json", ".jsonl", ".parquet")
_PAIRS = [("input", "output"), ("question", "answer"), ("instruction", "output"), ("prompt", "completion"),
          ("query", "response")]


@dataclass
class ConvertResult:
    rows: int = 0
    written: int = 0
    dropped: list[str] = field(default_factory=list)  # where + why, one per dropped row
    input_col: str = ""
    output_col: str = ""


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value != value:
            return ""
        return str(int(value)) if value.is_integer() else str(value)
    return str(value)


def _pick(columns: list[str], wanted: str | None, which: str, src: Path) -> str:
    if wanted is not None:
        if wanted in columns:
            return wanted
        lower = {c.lower(): c for c in columns}
        if wanted.lower() in lower:
            return lower[wanted.lower()]
        raise TunesmithError(f"{src}: no column {wanted!r} (columns found: {', '.join(map(repr, columns))})",
                             f"pass --{which}-col with one of the columns found")
    raise AssertionError


def _guess(columns: list[str], src: Path) -> tuple[str, str]:
    lower = {c.lower().strip(): c for c in columns}
    for a, b in _PAIRS:
        if a in lower and b in lower:
            return lower[a], lower[b]
    raise TunesmithError(f"{src}: cannot tell which columns hold the input and the output (columns found: "
                         f"{', '.join(map(repr, columns))})", "pass --input-col and --output-col")


def convert_table(src: str | os.PathLike, dst: str | os.PathLike, *, input_col: str | None = None,
                  output_col: str | None = None, system: str = "", system_template: str | None = None,
                  sheet: str | int | None = None) -> ConvertResult:
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise TunesmithError(f"{src} does not exist", "check the input path")
    if src.suffix.lower() not in CONVERT_SUFFIXES:
        raise TunesmithError(f"{src}: unsupported file type {src.suffix or '(none)'}",
                             f"use one of {', '.join(CONVERT_SUFFIXES)}")
    if system and system_template:
        raise TunesmithError("pass --system or --system-template, not both")
    check_outputs({"IN": src}, {"OUT": dst})
    system_text = resolve_system(system, system_template)
    result = ConvertResult()
    lines: list[str] = []
    columns: list[str] | None = None
    for raw in iter_file(src, sheet=sheet):
        if not isinstance(raw.data, dict):
            raise TunesmithError(f"{raw.where}: expected a row with named columns, got {type(raw.data).__name__}")
        if columns is None:
            columns = [str(c) for c in raw.data]
            if input_col is None and output_col is None:
                result.input_col, result.output_col = _guess(columns, src)
            else:
                if input_col is None or output_col is None:
                    raise TunesmithError("pass both --input-col and --output-col (or neither, to guess)")
                result.input_col = _pick(columns, input_col, "input", src)
                result.output_col = _pick(columns, output_col, "output", src)
        result.rows += 1
        row = raw.data
        if result.input_col not in row or result.output_col not in row:
            missing = result.input_col if result.input_col not in row else result.output_col
            raise TunesmithError(f"{raw.where}: missing column {missing!r} (columns found: "
                                 f"{', '.join(map(repr, row))})", "every record needs the same columns")
        question, answer = _cell(row[result.input_col]), _cell(row[result.output_col])
        if not question.strip() or not answer.strip():
            empty = result.input_col if not question.strip() else result.output_col
            result.dropped.append(f"{raw.where}: empty {empty!r}")
            continue
        turn = Turn(question.strip(), answer.strip(), system_text)
        lines.append(json.dumps(conversation_to_json([turn]), ensure_ascii=False))
    if result.rows == 0:
        raise TunesmithError(f"{src} is empty", "the file has no rows")
    with atomic_path(dst) as tmp:
        tmp.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
    result.written = len(lines)
    return result


def _records(src: Path) -> list[Any]:
    return [raw.data for raw in iter_file(src)]


def _write(path: Path, records: list[Any]) -> None:
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".json":
            tmp.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        else:
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def default_split_paths(src: str | os.PathLike) -> tuple[Path, Path]:
    src = Path(src)
    return src.with_name(f"{src.stem}-train.jsonl"), src.with_name(f"{src.stem}-test.jsonl")


def split_indices(n: int, ratio: float, *, seed: int) -> tuple[list[int], list[int]]:
    """The one split rule (`data split` and training's held-out `data.validation` fraction): a seeded shuffle of
    ``range(n)``, ``round(n * ratio)`` (at least 1, at most n - 1) to the first part; each part in input order."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_first = min(max(1, round(n * ratio)), n - 1)
    return sorted(order[:n_first]), sorted(order[n_first:])


def split_records(src: str | os.PathLike, train: str | os.PathLike | None = None,
                  test: str | os.PathLike | None = None, *, ratio: float = 0.7, seed: int = 0) -> tuple[int, int]:
    src = Path(src)
    if not 0.0 < ratio < 1.0:
        raise TunesmithError(f"--ratio must be between 0 and 1 (exclusive), got {ratio}", "e.g. --ratio 0.7")
    if not src.exists():
        raise TunesmithError(f"{src} does not exist", "check the input path")
    d_train, d_test = default_split_paths(src)
    train_path, test_path = Path(train or d_train), Path(test or d_test)
    check_outputs({"IN": src}, {"--train": train_path, "--test": test_path})
    records = _records(src)
    if len(records) < 2:
        raise TunesmithError(f"{src} has {len(records)} record(s); a split needs at least 2")
    train_idx, test_idx = split_indices(len(records), ratio, seed=seed)
    _write(train_path, [records[i] for i in train_idx])
    _write(test_path, [records[i] for i in test_idx])
    return len(train_idx), len(test_idx)
