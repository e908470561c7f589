"""One transient progress bar fed by ``(done, total)`` callbacks, for work that reports its own progress:
tokenizing the training data (counts), writing or merging weights (bytes)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def callback_bar(description: str, *, unit: str = "count", enabled: bool | None = None,
                 stderr: bool = False) -> Iterator[Callable[[int, int], None] | None]:
    """A rich bar with ETA (and the transfer rate for ``unit="bytes"``) that disappears when done; yields the
    ``report(done, total)`` callback, or ``None`` when disabled (other ranks, --no-progress). ``enabled=None``:
    only when the console (stdout, or stderr) is a terminal, not when output goes to a file or a pipe."""
    from rich.console import Console

    console = Console(stderr=stderr)
    if not (console.is_terminal if enabled is None else enabled):
        yield None
        return
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
    bar = Progress(TextColumn(description), BarColumn(), *amount, TextColumn("ETA"), TimeRemainingColumn(),
                   console=console, transient=True)
    task = bar.add_task(description, total=None)
    with bar:
        yield lambda done, total: bar.update(task, completed=done, total=total)
