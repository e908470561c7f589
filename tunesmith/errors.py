"""The one exception type for mistakes a user can fix.

The CLI prints it as a single line ("error: <message> (hint: <hint>)") and exits with code 2;
anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class TunesmithError(Exception):
    """A user error: what went wrong (naming the file / line / key) and how to fix it."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


def did_you_mean(word: str, choices: Iterable[str], n: int = 3) -> str:
    """A short 'did you mean ...?' phrase, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.6)
    if not close:
        return ""
    return "did you mean " + " or ".join(repr(c) for c in close) + "?"


def unknown_name_error(kind: str, name: str, valid: Iterable[str], list_command: str | None = None) -> TunesmithError:
    """Error for an unknown template / format / recipe / ... name, listing or suggesting valid ones."""
    valid = sorted(valid)
    suggestion = did_you_mean(name, valid)
    if list_command:
        hint = f"{suggestion} run `tunesmith {list_command}` to see all {len(valid)}".strip()
    else:
        hint = f"{suggestion} valid: {', '.join(valid)}".strip()
    return TunesmithError(f"unknown {kind} {name!r}", hint)
