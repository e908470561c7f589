"""Where records come from: files (with the line or row each record starts on), folders, hub datasets.

Files: .jsonl (also a JSON array saved as .jsonl, and bare JSON lists per line), .json (an array, an object
holding one list, or JSON lines), .csv / .tsv, .parquet, .xlsx / .xls, .txt (one `{"text": line}` per
non-empty line), or a folder of those (the files whose name contains the split, when any do). A path that
does not exist and looks like `owner/name` is loaded with `datasets.load_dataset` when the hub is reachable
(or with ModelScope's MsDataset when that package is installed and the id is not on Hugging Face);
offline, the error says to download it and pass the local folder.

Public API: `iter_raw(path, *, name=None, split="train", sheet=None)` and `iter_file(path, *, sheet=None)`
yield `RawRecord(data, where, line)`; `data_files(path, split)`; `FILE_SUFFIXES`. Malformed JSON, empty files,
non-UTF-8 text and unsupported types raise `TunesmithError` naming the file and line.
"""

from __future__ import annotations

import bisect
import csv
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.errors import TunesmithError

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".xlsx", ".xls", ".txt")


@dataclass(frozen=True)
class RawRecord:
    data: Any
    where: str  # "file:line" or "file row N" or "hub-id row N"
    line: int


def _line_starts(text: str) -> list[int]:
    starts = [0]
    starts.extend(m.end() for m in re.finditer("\n", text))
    return starts


def _line_of(starts: list[int], pos: int) -> int:
    return bisect.bisect_right(starts, pos)


def _json_error(path: Path, line: int, exc: json.JSONDecodeError) -> TunesmithError:
    return TunesmithError(f"{path}:{line}: malformed JSON ({exc.msg} at column {exc.colno})",
                          "fix or remove that line (each line of a .jsonl file is one JSON value)")


def _iter_json_array(path: Path, text: str, offset: int = 0) -> Iterator[RawRecord]:
    """Elements of a top-level JSON array with the line each one starts on."""
    dec = json.JSONDecoder()
    starts = _line_starts(text)
    pos = text.index("[", offset) + 1
    n = len(text)
    while True:
        while pos < n and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= n:
            raise TunesmithError(f"{path}:{_line_of(starts, n - 1)}: malformed JSON (the array is not closed)",
                                 "the file ends before the closing ]")
        if text[pos] == "]":
            return
        try:
            value, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise _json_error(path, exc.lineno, exc) from None
        line = _line_of(starts, pos)
        yield RawRecord(value, f"{path}:{line}", line)
        pos = end


@dataclass(frozen=True)
class UnreadableLine:
    """A JSON-lines line that is not JSON, handed on as a record (with `keep_unreadable`) so that a reader can
    skip and count it, or a checker list it, like any other bad record."""

    message: str


def _iter_jsonl(path: Path, text: str, keep_unreadable: bool = False) -> Iterator[RawRecord]:
    for i, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            if not keep_unreadable:
                raise _json_error(path, i, exc) from None
            value = UnreadableLine(f"malformed JSON ({exc.msg} at column {exc.colno})")
        yield RawRecord(value, f"{path}:{i}", i)


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TunesmithError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})",
                             "save the file as UTF-8") from None
    if not text.strip():
        raise TunesmithError(f"{path} is empty", "the file has no records; check the path")
    return text


def _iter_json_file(path: Path, keep_unreadable: bool = False) -> Iterator[RawRecord]:
    text = _read_text(path)
    stripped = text.lstrip()
    if path.suffix == ".jsonl":
        first = stripped.split("\n", 1)[0]
        if stripped.startswith("["):
            try:  # a bare list per line (openai) or a JSON array saved as .jsonl?
                json.loads(first)
            except json.JSONDecodeError:
                yield from _iter_json_array(path, text)
                return
        yield from _iter_jsonl(path, text, keep_unreadable)
        return
    if stripped.startswith("["):
        yield from _iter_json_array(path, text)
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON lines saved as .json
            yield from _iter_jsonl(path, text, keep_unreadable)
            return
        raise _json_error(path, exc.lineno, exc) from None
    if isinstance(value, dict):
        lists = [k for k, v in value.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
        if len(lists) == 1 and len(value) <= 3 and lists[0] not in ("conversation", "conversations", "messages"):
            for i, item in enumerate(value[lists[0]]):
                yield RawRecord(item, f"{path} {lists[0]}[{i}]", i + 1)
            return
    yield RawRecord(value, f"{path}:1", 1)


def _iter_delimited(path: Path, delimiter: str) -> Iterator[RawRecord]:
    text = _read_text(path)
    reader = csv.DictReader(text.splitlines(keepends=True), delimiter=delimiter)
    if not reader.fieldnames:
        raise TunesmithError(f"{path} has no header row", "the first line must name the columns")
    start = 2
    for row in reader:
        yield RawRecord({k: (v if v is not None else "") for k, v in row.items() if k is not None},
                        f"{path}:{start}", start)
        start = reader.line_num + 1


def _iter_table(rows: list[dict[str, Any]], where: str, first_row: int) -> Iterator[RawRecord]:
    for i, row in enumerate(rows):
        clean = {str(k): ("" if v is None or (isinstance(v, float) and v != v) else v) for k, v in row.items()}
        yield RawRecord(clean, f"{where} row {i + first_row}", i + first_row)


def _iter_excel(path: Path, sheet: str | int | None = None) -> Iterator[RawRecord]:
    import pandas as pd
    try:
        frame = pd.read_excel(path, sheet_name=0 if sheet is None else sheet, dtype=object)
    except ImportError as exc:
        raise TunesmithError(f"cannot read {path}: {exc}", "pip install openpyxl (xlsx) or xlrd (xls)") from None
    except ValueError as exc:
        raise TunesmithError(f"cannot read {path}: {exc}", "check --sheet (name or 0-based index)") from None
    if frame.empty and not len(frame.columns):
        raise TunesmithError(f"{path} is empty", "the sheet has no rows")
    # Excel row numbers: header is row 1
    yield from _iter_table(frame.to_dict("records"), str(path), 2)


def _iter_parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq
    rows = pq.read_table(path).to_pylist()
    if not rows:
        raise TunesmithError(f"{path} is empty", "the file has no rows")
    yield from _iter_table(rows, str(path), 1)


def _iter_txt(path: Path) -> Iterator[RawRecord]:
    text = _read_text(path)
    for i, raw in enumerate(text.splitlines(), 1):
        if raw.strip():
            yield RawRecord({"text": raw}, f"{path}:{i}", i)


def iter_file(path: Path, *, sheet: str | int | None = None, keep_unreadable: bool = False) -> Iterator[RawRecord]:
    """The records of one file. `keep_unreadable`: a JSON-lines line that is not JSON comes as an
    `UnreadableLine` record instead of stopping with an error (a broken JSON array or file still stops)."""
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        yield from _iter_json_file(path, keep_unreadable)
    elif suffix in (".csv", ".tsv"):
        yield from _iter_delimited(path, "\t" if suffix == ".tsv" else ",")
    elif suffix in (".xlsx", ".xls"):
        yield from _iter_excel(path, sheet)
    elif suffix == ".parquet":
        yield from _iter_parquet(path)
    elif suffix == ".txt":
        yield from _iter_txt(path)
    else:
        raise TunesmithError(f"{path}: unsupported file type {suffix or '(none)'}",
                             f"use one of {', '.join(FILE_SUFFIXES)}")


def data_files(path: Path, split: str | None = "train") -> list[Path]:
    """The data files of a file or folder (a folder's files whose name contains `split`, if any do)."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if split:
        chosen = [p for p in files if split in p.name]
        files = chosen or files
    if not files:
        raise TunesmithError(f"{path} holds no data files", f"expected {', '.join(FILE_SUFFIXES)} files")
    return files


def _looks_like_hub_id(text: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", text)) and not text.startswith((".", "/"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check, so an offline machine gets the error at once instead of after minutes of retries."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_modelscope(dataset_id: str, name: str | None, split: str | None) -> Any:
    """ModelScope datasets (e.g. damo/MSAgent-Bench) when the `modelscope` package is installed, else None."""
    import importlib.util

    if importlib.util.find_spec("modelscope") is None:
        return None
    from modelscope.msdatasets import MsDataset  # type: ignore[import-not-found]

    ds = MsDataset.load(dataset_id, subset_name=name, split=split or None)
    return ds.to_hf_dataset() if hasattr(ds, "to_hf_dataset") else ds


def _iter_hub(dataset_id: str, name: str | None, split: str | None) -> Iterator[RawRecord]:
    local = f"./{dataset_id.split('/')[-1]}"
    hint = (f"download it once (Hugging Face: `hf download --repo-type dataset {dataset_id} "
            f"--local-dir {local}`; ModelScope: `modelscope download --dataset {dataset_id} --local_dir {local}`) "
            "and set data.path to the local folder")
    offline = os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "YES", "yes") or os.environ.get(
        "HF_DATASETS_OFFLINE", "") in ("1", "true", "yes")
    if offline or not _hub_reachable():
        raise TunesmithError(f"dataset {dataset_id!r} is not a local path and the hub is offline", hint)
    try:
        import datasets

        ds = datasets.load_dataset(dataset_id, name, split=split or None)
    except Exception as exc:  # noqa: BLE001 - network errors, missing repos: the user fixes them the same way
        msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        try:
            ds = _load_modelscope(dataset_id, name, split)
        except Exception:  # noqa: BLE001 - report the Hugging Face error, the usual source
            ds = None
        if ds is None:
            raise TunesmithError(f"dataset {dataset_id!r} is not a local path and could not be loaded from the hub "
                                 f"({msg})", hint) from None
    if hasattr(ds, "keys"):  # DatasetDict (split=None): all splits in order
        parts = [ds[k] for k in ds.keys()]
    else:
        parts = [ds]
    n = 0
    for part in parts:
        for row in part:
            n += 1
            yield RawRecord(row, f"{dataset_id} row {n}", n)


def iter_raw(path: str | os.PathLike, *, name: str | None = None, split: str | None = "train",
             sheet: str | int | None = None, keep_unreadable: bool = False) -> Iterator[RawRecord]:
    """Every raw record of a local file / folder, or of a hub dataset id when online (see iter_file)."""
    p = Path(path).expanduser()
    if p.exists():
        for f in data_files(p, split):
            yield from iter_file(f, sheet=sheet, keep_unreadable=keep_unreadable)
        return
    if _looks_like_hub_id(str(path)):
        yield from _iter_hub(str(path), name, split)
        return
    raise TunesmithError(f"data file {path} does not exist", "check data.path (a local file, folder or hub id)")
