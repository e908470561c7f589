"""The interactive loop of `tunesmith chat`, XTuner-compatible.

Prompt `double enter to end input (EXIT: exit chat, RESET: reset history) >>> `; input lines are joined until
an empty line; `EXIT` leaves, `RESET` clears the history; end of input (Ctrl-D, or the end of a pipe) leaves
cleanly. Answers go to stdout; notices (context overflow, tool steps) to stderr, so piped output stays clean.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

PROMPT = "\ndouble enter to end input (EXIT: exit chat, RESET: reset history) >>> "
RESET_MESSAGE = "Log: History responses have been removed!"


def read_input(stream: TextIO, out: TextIO) -> str | None:
    """One user message: lines until an empty line; None at end of input with nothing typed."""
    out.write(PROMPT)
    out.flush()
    lines: list[str] = []
    while True:
        line = stream.readline()
        if not line:  # EOF
            return "\n".join(lines) if lines else None
        line = line.rstrip("\r\n")
        if line.strip() == "":
            if lines:
                return "\n".join(lines)
            continue  # empty line before any text: keep waiting, as XTuner does
        lines.append(line)


def run_repl(
    answer: Callable[[str], None],
    reset: Callable[[], None],
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    on_error: Callable[[Exception], bool] | None = None,
    on_interrupt: Callable[[], None] | None = None,
) -> None:
    """Loop: read a message, `answer` it (it prints), until EXIT or end of input. `on_error` decides whether an
    exception raised while answering is reported and the loop goes on (True) or re-raised. Ctrl-C while an
    answer is generated stops that answer (`on_interrupt` forgets the turn); Ctrl-C at the prompt leaves."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    while True:
        text = read_input(stdin, stdout)
        if text is None:
            stdout.write("\n")
            stdout.flush()
            return
        command = text.strip()
        if command == "EXIT":
            return
        if command == "RESET":
            reset()
            stdout.write(RESET_MESSAGE + "\n")
            stdout.flush()
            continue
        try:
            answer(text)
        except KeyboardInterrupt:
            if on_interrupt is None:
                raise
            on_interrupt()
            stdout.write("\n[interrupted; that message is dropped from the history]\n")
            stdout.flush()
        except Exception as exc:  # noqa: BLE001 - the caller decides
            if on_error is None or not on_error(exc):
                raise
