"""Field checks shared by the dataset readers: each returns the record's value or raises `RecordError` saying
what the record should hold (the caller adds file and line)."""

from __future__ import annotations

from typing import Any

from tunesmith.data.conversation import RecordError


def need(rec: Any, *keys: str) -> None:
    if not isinstance(rec, dict):
        raise RecordError(f"expected a JSON object with {', '.join(repr(k) for k in keys)}, "
                          f"got {type(rec).__name__}")
    missing = [k for k in keys if k not in rec]
    if missing:
        found = ", ".join(repr(k) for k in rec) or "none"
        raise RecordError(f"missing column {', '.join(repr(k) for k in missing)} (columns found: {found})")


def nonempty_list(value: Any, key: str, shape: str) -> list:
    """The record's list of turns / messages, or a RecordError saying what it should look like."""
    if not isinstance(value, list) or not value:
        raise RecordError(f"{key!r} must be a non-empty list of {shape}")
    return value


def text_field(rec: dict, key: str, *, allow_empty: bool = False) -> str:
    value = rec.get(key, "")
    if value is None:
        value = ""
    if not isinstance(value, str):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        else:
            raise RecordError(f"{key!r} must be text, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RecordError(f"empty or whitespace-only {key!r}")
    return value


def as_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    if isinstance(value, int):
        return bool(value)
    raise RecordError(f"{key!r} must be true or false, got {value!r}")
