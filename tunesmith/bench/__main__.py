"""``python -m tunesmith.bench ...``: the ``bench`` command alone (same flags as ``tunesmith bench``), for
machines where the other command groups' dependencies are not installed (the GPU suite uses it)."""

from __future__ import annotations

import sys

import typer

from tunesmith.bench.cli import BENCH_HELP, bench
from tunesmith.errors import TunesmithError


def main() -> None:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(help=BENCH_HELP)(bench)
    try:
        app(prog_name="tunesmith bench")
    except TunesmithError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
