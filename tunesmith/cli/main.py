"""Entry point: builds the command tree and applies the error convention.

A `TunesmithError` prints as one line on stderr and exits 2; `--debug` (anywhere on the line) or
TUNESMITH_DEBUG=1 shows the traceback instead. Ctrl-C exits 130 without a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

from tunesmith import __version__
from tunesmith.errors import TunesmithError

# Command groups that really work, each a module of tunesmith.cli with `register(app)`. Heavy imports
# (torch, transformers) stay inside the command functions so `tunesmith --help` starts fast.
COMMAND_MODULES = [  # in the order of the workflow, which is the order `--help` lists them
    "config_cmds",
    "data_cmds",
    "train_cmds",
    "convert_cmds",
    "chat_cmds",
    "serve_cmds",
    "eval_cmds",
    "bench_cmds",
]

HELP = """\
Fine-tune large language models: QLoRA / LoRA / full, one GPU or many.

Typical workflow (XTuner-compatible):

\b
  tunesmith list-cfg -p oasst1
  tunesmith copy-cfg internlm_chat_7b_qlora_oasst1_e3 .
  tunesmith train ./internlm_chat_7b_qlora_oasst1_e3_copy.yaml

Add --debug to any command to see a full traceback on errors.
"""


def build_app() -> typer.Typer:
    app = typer.Typer(
        name="tunesmith",
        help=HELP,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    def _version(value: bool) -> None:
        if value:
            typer.echo(f"tunesmith {__version__}")
            raise typer.Exit()

    @app.callback()
    def _root(
        version: bool = typer.Option(
            False, "--version", "-v", callback=_version, is_eager=True, help="Show the version."
        ),
    ) -> None:
        pass

    for name in COMMAND_MODULES:
        importlib.import_module(f"tunesmith.cli.{name}").register(app)
    return app


def debug_enabled() -> bool:
    return os.environ.get("TUNESMITH_DEBUG", "").lower() in {"1", "true", "yes"}


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args:
        args = [a for a in args if a != "--debug"]
        os.environ["TUNESMITH_DEBUG"] = "1"
    app = build_app()
    try:
        app(args=args, prog_name="tunesmith", standalone_mode=True)
    except TunesmithError as exc:
        if debug_enabled():
            raise
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        if debug_enabled():
            raise
        typer.echo("interrupted", err=True)
        sys.exit(130)
