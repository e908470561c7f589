"""`bench`: the command lives with the bench stage (tunesmith/bench/cli.py); this registers it."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from tunesmith.bench.cli import BENCH_HELP, bench

    app.command("bench", help=BENCH_HELP)(bench)
