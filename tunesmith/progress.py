"""Progress of long work, on a terminal and off it (``nohup ... > run.log 2>&1 &`` then ``tail -f run.log``).

`callback_bar` follows work that reports its own ``(done, total)``: tokenizing the training data (counts),
writing or merging weights (bytes). On a terminal it is a transient rich bar; without one (output to a file or a
pipe) it is a few plain lines, each flushed at once: when the work starts, at most one per quarter of it (only
after ten quiet seconds) and when it is done, with its duration. `library_bars` keeps the libraries' own tqdm
bars out of such logs. `format_duration` and `eta` are how every elapsed time and ETA is worked out and written
(h:mm:ss, as rich's bars show them), the training loop's included.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator

QUIET_SECONDS = 10.0  # a plain line between start and done only after this long without one


def is_terminal(*, stderr: bool = False) -> bool:
    """Whether stdout (or stderr) is a terminal a live bar can redraw (rich's rule: TTY_COMPATIBLE, FORCE_COLOR)."""
    from rich.console import Console

    return Console(stderr=stderr).is_terminal


def format_duration(seconds: float | None) -> str:
    """``h:mm:ss``; ``-:--:--`` when not known yet."""
    if seconds is None or not math.isfinite(seconds):
        return "-:--:--"
    minutes, secs = divmod(max(0, round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def eta(elapsed: float, done: float, left: float) -> float | None:
    """Seconds still needed for ``left`` more units at the pace of ``done`` units in ``elapsed`` seconds."""
    return elapsed / done * max(0.0, left) if done > 0 else None


@contextlib.contextmanager
def library_bars(enabled: bool) -> Iterator[None]:
    """transformers' and huggingface_hub's own tqdm bars (loading weights, downloads) only when ``enabled``:
    without a terminal they are carriage-return noise in a log file."""
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def callback_bar(description: str, *, unit: str = "count", enabled: bool = True, bar: bool | None = None,
                 stderr: bool = False, printer: Callable[[str], None] | None = None,
                 ) -> Iterator[Callable[[int, int], None] | None]:
    """Yields the ``report(done, total)`` callback, or ``None`` when ``enabled`` is false (other ranks).
    ``bar=None``: a rich bar with ETA (and the transfer rate for ``unit="bytes"``) when the console (stdout, or
    stderr) is a terminal, else plain lines; ``bar=False``: plain lines (given to ``printer`` when there is one,
    else printed to that console); ``bar=True``: the rich bar."""
    if not enabled:
        yield None
        return
    if bar is None:
        bar = is_terminal(stderr=stderr)
    if not bar:
        stream = sys.stderr if stderr else sys.stdout
        lines = _PlainLines(description, unit, printer or (lambda text: print(text, file=stream, flush=True)))
        yield lines.report
        lines.finish()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    amount = [DownloadColumn(), TransferSpeedColumn()] if unit == "bytes" else [MofNCompleteColumn()]
    live = Progress(TextColumn(description), BarColumn(), *amount, TextColumn("ETA"), TimeRemainingColumn(),
                    console=Console(stderr=stderr), transient=True)
    task = live.add_task(description, total=None)
    with live:
        yield lambda done, total: live.update(task, completed=done, total=total)


class _PlainLines:
    """The plain-text stand-in for the bar: start, at most three quarter marks, done."""

    def __init__(self, description: str, unit: str, printer: Callable[[str], None]):
        self.description, self.unit, self.printer = description, unit, printer
        self.start = self.last = 0.0
        self.started = False
        self.quarter, self.total = 0, 0

    def amount(self, n: int) -> str:
        if self.unit == "bytes":
            from rich.filesize import decimal

            return decimal(n)
        return f"{n:,}"

    def report(self, done: int, total: int) -> None:
        now = time.perf_counter()
        self.total = total
        if not self.started:  # lazily: work that never reports (a cache hit) prints nothing
            self.started, self.start, self.last = True, now, now
            self.printer(f"{self.description}: started, {self.amount(total)} in all")
        quarter = 4 * done // total if total > 0 else 0
        if quarter <= self.quarter or quarter >= 4:
            return
        self.quarter = quarter
        if now - self.last >= QUIET_SECONDS:
            self.last, elapsed = now, now - self.start
            self.printer(f"{self.description}: {100 * done // total}% ({self.amount(done)} of "
                         f"{self.amount(total)}), elapsed {format_duration(elapsed)}, "
                         f"ETA {format_duration(eta(elapsed, done, total - done))}")

    def finish(self) -> None:
        if self.started:
            elapsed = time.perf_counter() - self.start
            self.printer(f"{self.description}: done, {self.amount(self.total)} in {format_duration(elapsed)}")
