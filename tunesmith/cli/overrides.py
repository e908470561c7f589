"""`--set a.b=1 c=2` and `--set a.b=1 --set c=2` alike, for every command that takes config overrides."""

from __future__ import annotations

import typer

from tunesmith.errors import TunesmithError

# what a command that takes `--set` registers with: the values after the first land in ctx.args
OVERRIDES_CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": False}
SET_HELP = "Override config keys, e.g. --set data.path=./my.jsonl training.lr=1e-4 (alias --cfg-options)."


def overrides_from(ctx: typer.Context, given: list[str] | None) -> list[str]:
    """The overrides of a command line: those after `--set` and any further key=value words."""
    extra = list(ctx.args)
    stray = [a for a in extra if "=" not in a]
    if stray:
        raise TunesmithError(f"unexpected argument {stray[0]!r}", "overrides are key=value words after --set")
    return list(given or []) + extra
