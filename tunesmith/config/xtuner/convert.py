"""The public entry points: check and parse the XTuner file, convert it, validate the result (a value the schema
refuses falls back to the recipe default with a note) and write the commented YAML atomically."""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tunesmith.config.dump import dump_config
from tunesmith.config.load import validate
from tunesmith.config.overrides import set_dotted
from tunesmith.config.schema import TrainConfig
from tunesmith.config.xtuner.evaluate import ConfigModule
from tunesmith.config.xtuner.fields import shortened
from tunesmith.config.xtuner.lookup import Reading
from tunesmith.config.xtuner.mapping import Converter
from tunesmith.errors import TunesmithError
from tunesmith.files import check_outputs, write_text_atomic

MAX_BYTES = 1 << 20  # XTuner's configs are a few kB; a larger .py file is not one


@dataclass
class XtunerConversion:
    """What was read from an XTuner config and the validated tunesmith config made from it."""

    source: Path
    config: TrainConfig
    recipe: str  # the built-in recipe whose values fill what the file does not say
    read: list[Reading] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _validated(converter: Converter, data: dict[str, Any], source: str) -> TrainConfig:
    """Validate; a value read from the file that the schema refuses goes back to the recipe default, with a note."""
    for _ in range(len(converter.settings) + 1):
        try:
            return TrainConfig.model_validate(data)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(p) for p in error.get("loc", ()))
            culprit = next((k for k in converter.settings if where == k or where.startswith(k + ".")), None)
            if culprit is None or culprit == "method":
                validate(data, source)  # raises the one-line error naming the key
                raise
            default = converter.default(culprit)
            message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
            origin = next((r.origin for r in converter.read if r.key == culprit), culprit)
            refused = shortened(converter.settings.pop(culprit))
            converter.notes.append(f"{origin} gives {culprit} = {refused}, which tunesmith refuses ({message}): kept "
                                   f"the recipe default ({default!r})")
            converter.read = [r for r in converter.read if r.key != culprit]
            set_dotted(data, culprit, default)
    return validate(data, source)


def _check_source(py_path: Path) -> None:
    if not py_path.exists():
        raise TunesmithError(f"XTuner config {py_path} does not exist", "pass the path of an XTuner .py config")
    if py_path.is_dir():
        raise TunesmithError(f"{py_path} is a folder, not an XTuner config", "pass the path of an XTuner .py config")
    if py_path.suffix != ".py":
        hint = (f"it is a tunesmith config already: tunesmith train {py_path}" if py_path.suffix in {".yaml", ".yml"}
                else "XTuner configs are Python files ending in .py")
        raise TunesmithError(f"{py_path} is not a Python file", hint)


def _parse(py_path: Path) -> ast.Module:
    _check_source(py_path)
    try:
        if py_path.stat().st_size > MAX_BYTES:
            raise TunesmithError(f"{py_path} is {py_path.stat().st_size} bytes, too large for an XTuner config",
                                 "pass an XTuner config (a few kB of Python)")
        raw = py_path.read_bytes()
    except OSError as exc:
        raise TunesmithError(f"cannot read {py_path}: {exc.strerror}") from exc
    try:
        return ast.parse(raw, filename=str(py_path))  # parsing compiles nothing and runs nothing
    except SyntaxError as exc:
        where = f" line {exc.lineno}" if exc.lineno else ""
        raise TunesmithError(f"{py_path}{where}: {exc.msg}", "the file is not valid Python; fix that line") from exc
    except (ValueError, RecursionError, MemoryError) as exc:
        raise TunesmithError(f"{py_path} cannot be parsed as Python ({type(exc).__name__})",
                             "pass an XTuner .py config") from exc


def read_xtuner_config(py_path: str | Path, *, formats: Collection[str] | None = None,
                       templates: Collection[str] | None = None,
                       system_templates: Collection[str] | None = None) -> XtunerConversion:
    """Read `py_path` (parsed, never run) into a validated tunesmith config; see the package docstring."""
    path = Path(py_path)
    try:
        converter = Converter(ConfigModule(_parse(path)), formats, templates, system_templates)
        data, recipe = converter.convert()
    except RecursionError:
        raise TunesmithError(f"{path}: its values are nested too deeply to read",
                             "pass an XTuner 0.x training config") from None
    if not any(r.key in {"model.path", "data.path", "training.lr", "method"} for r in converter.read) and not any(
            n.startswith(("could not use", "could not read")) for n in converter.notes):
        raise TunesmithError(f"{path} has none of an XTuner config's settings (pretrained_model_name_or_path, "
                             "data_path, lr, model = dict(...))", "pass an XTuner 0.x training config")
    config = _validated(converter, data, str(path))
    return XtunerConversion(path, config, recipe, converter.read, converter.notes)


def convert_xtuner_config(py_path: str | Path, *, formats: Collection[str] | None = None,
                          templates: Collection[str] | None = None,
                          system_templates: Collection[str] | None = None) -> tuple[dict[str, Any], list[str]]:
    """The tunesmith config (a plain mapping that validates) read from the XTuner config `py_path`, and the notes
    on what could not be read or carried over."""
    result = read_xtuner_config(py_path, formats=formats, templates=templates, system_templates=system_templates)
    return result.config.model_dump(mode="json"), result.notes


def _header(src: Path, result: XtunerConversion) -> str:
    """The comment block on top of the written YAML: where it came from and the notes, wrapped."""
    lines = textwrap.wrap(f"converted from the XTuner config {src.name} by `tunesmith convert xtuner-config`; what "
                          f"the file does not say comes from the built-in recipe {result.recipe}", 110,
                          break_on_hyphens=False)
    if result.notes:
        lines.append("notes:")
        for note in result.notes:
            lines += textwrap.wrap(" ".join(note.split()), 110, initial_indent="  - ", subsequent_indent="    ",
                                   break_on_hyphens=False)
    return "".join(f"# {line}\n" for line in lines)


def convert_xtuner_file(src: str | Path, out: str | Path, *, overwrite: bool = False,
                        formats: Collection[str] | None = None, templates: Collection[str] | None = None,
                        system_templates: Collection[str] | None = None) -> XtunerConversion:
    """Convert the XTuner config `src` and write the full, commented YAML to `out` (atomically; an existing `out`
    only with overwrite). Every check runs before anything is written."""
    src, out = Path(src), Path(out)
    _check_source(src)
    if out.suffix not in {".yaml", ".yml"}:
        raise TunesmithError(f"output {out} must end in .yaml", f"e.g. {out.with_suffix('.yaml')}")
    check_outputs({"SRC": src}, {"OUT": out})
    if out.is_dir():
        raise TunesmithError(f"{out} is a folder", "pass a file name ending in .yaml")
    if out.exists() and not overwrite:
        raise TunesmithError(f"{out} already exists", "pass --overwrite to replace it, or choose another name")
    result = read_xtuner_config(src, formats=formats, templates=templates, system_templates=system_templates)
    write_text_atomic(out, _header(src, result) + dump_config(result.config, name=out.stem, file=str(out)))
    return result
