"""`list-cfg` and `copy-cfg`: browse the built-in recipes and write one out as editable YAML."""

from __future__ import annotations

from pathlib import Path

import typer

from tunesmith.config import build_recipe, dump_config, recipe_names
from tunesmith.errors import TunesmithError
from tunesmith.files import write_text_atomic


def list_cfg(
    pattern: str = typer.Option(None, "-p", "--pattern", help="Show names containing this text (case-insensitive)."),
) -> None:
    """List the built-in training recipes.

    Example: tunesmith list-cfg -p internlm_chat_7b
    """
    names = recipe_names()
    if pattern:
        names = [n for n in names if pattern.lower() in n.lower()]
    if not names:
        raise TunesmithError(f"no recipe matches {pattern!r}", "try a shorter pattern, e.g. -p qlora")
    typer.echo("\n".join(names))


def copy_cfg(
    name: str = typer.Argument(..., help="Recipe name from `tunesmith list-cfg`."),
    save_dir: Path = typer.Argument(..., help="Folder to write NAME_copy.yaml into."),
) -> None:
    """Write a built-in recipe as a fully explicit, commented YAML file you can edit.

    Example: tunesmith copy-cfg internlm_chat_7b_qlora_oasst1_e3 .
    """
    cfg = build_recipe(name)
    if save_dir.exists() and not save_dir.is_dir():
        raise TunesmithError(f"{save_dir} is a file, not a folder", "pass a folder to copy the config into")
    target = save_dir / f"{name}_copy.yaml"
    write_text_atomic(target, dump_config(cfg, name=name, file=str(target)))
    typer.echo(f"Copy to {target}")


def register(app: typer.Typer) -> None:
    app.command("list-cfg")(list_cfg)
    app.command("copy-cfg")(copy_cfg)
