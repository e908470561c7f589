"""The configuration reference page (docs/config.md), written from the schema itself so it cannot drift.

One table per section of `TrainConfig`: every key with its type, default, description (the Field's) and the
XTuner 0.x setting it replaces (`tunesmith.config.xtuner.names`). `docs/generate.py` writes the page and
tests/docs checks that the committed page is the generated one.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from tunesmith.config.schema import TrainConfig
from tunesmith.config.xtuner.names import XTUNER_NAMES

_INTRO = """\
A training config is one YAML file checked against the typed schema in `tunesmith/config/schema.py`, before any
model or data is read: a misspelt key gets a did-you-mean, and rules that span keys (QLoRA with ZeRO-3 needs
`quantization.quant_storage`, ...) fail at once. This page lists every key of that schema, section by section:
its type (`None` is YAML's `null`), the default a key takes when the file does not give it (XTuner's
`internlm_chat_7b_qlora_oasst1_e3`; a built-in recipe sets what its model, method and dataset need over them),
what it does, and the XTuner 0.x config setting it replaces.

`tunesmith copy-cfg NAME DIR` writes the built-in recipe NAME (see `tunesmith list-cfg`) to `DIR/NAME_copy.yaml`
in full: every key with its value and its description as a comment. Edit it (at least `model.path` and
`data.path`) and run `tunesmith train DIR/NAME_copy.yaml`. A file may also give only some keys: the others take
the defaults below.

`--set a.b=c` (alias `--cfg-options`, as XTuner's) on `train`, `check-custom-dataset`, `log-dataset` and
`convert pth_to_hf` sets the key `a.b` after the file or recipe is read and before it is checked, so an override
is validated like a key in the file. Values are read as YAML (`training.max_steps=null`,
`lora.target_modules=[q_proj,v_proj]`); several overrides may follow one `--set`
(`--set training.lr=1e-4 data.max_length=1024`). `train`'s `--deepspeed`, `--seed` and `--work-dir` set
`distributed.deepspeed`, `training.seed` and `work_dir`, over any `--set` of the same key.
"""

_NO_XTUNER_NAME = "—"  # a key tunesmith added, with no XTuner 0.x counterpart
_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _sections(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, type[BaseModel]]]:
    """(dotted prefix, model) for `model` and every section nested in it, in schema order."""
    yield prefix, model
    for name, field in model.model_fields.items():
        if _is_section(field.annotation):
            yield from _sections(field.annotation, f"{prefix}{name}.")


def _keys_of(model: type[BaseModel], prefix: str) -> Iterator[tuple[str, FieldInfo]]:
    for name, field in model.model_fields.items():
        if not _is_section(field.annotation):
            yield f"{prefix}{name}", field


def schema_fields() -> list[tuple[str, FieldInfo]]:
    """Every settable key of the schema, dotted (`method`, `model.path`, ...), with its Field."""
    return [item for prefix, model in _sections(TrainConfig) for item in _keys_of(model, prefix)]


def schema_keys() -> list[str]:
    return [key for key, _ in schema_fields()]


def type_text(annotation: Any) -> str:
    """`int`, `float | None`, `auto | bf16 | fp16` (a Literal's values), `list[str]`, `[float, float]`."""
    if annotation is None or annotation is type(None):
        return "None"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(str(value) for value in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(arg) for arg in args)
    if origin is list:
        return f"list[{type_text(args[0])}]"
    if origin is tuple:
        return "[" + ", ".join(type_text(arg) for arg in args) + "]"  # YAML writes a fixed tuple as a list
    return getattr(annotation, "__name__", str(annotation))


def _bounds(field: FieldInfo) -> str:
    """The Field's numeric limits (`>= 0, < 1`), read from its metadata."""
    found = [f"{sign} {getattr(rule, attr)}" for rule in field.metadata for attr, sign in _BOUNDS
             if getattr(rule, attr, None) is not None]
    return ", ".join(found)


def default_text(value: Any) -> str:
    """A default as a YAML user writes it: `null`, `true`, `0.0002`, `[0.9, 0.999]`; text bare unless empty."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value, ensure_ascii=False)


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell (GitHub needs `|` escaped even within code spans)."""
    return text.replace("\n", " ").replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{_cell(text)}`"


def _prose(text: str) -> str:
    """Plain text for a cell: `<name>` would be read as an HTML tag."""
    return _cell(text).replace("<", "&lt;")


def _xtuner_cell(key: str) -> str:
    """The XTuner name as code, a note in parentheses after it as text."""
    name = XTUNER_NAMES.get(key)
    if name is None:
        return _NO_XTUNER_NAME
    name, _, note = name.partition(" (")
    return _code(name) + (f" ({_prose(note)}" if note else "")


def _row(key: str, field: FieldInfo) -> str:
    kind = _code(type_text(field.annotation))
    if bounds := _bounds(field):
        kind += f" ({_cell(bounds)})"
    default = _code(default_text(field.get_default(call_default_factory=True)))
    cells = [_code(key), kind, default, _prose(field.description or ""), _xtuner_cell(key)]
    return "| " + " | ".join(cells) + " |"


def _section_markdown(prefix: str, model: type[BaseModel]) -> list[str]:
    rows = [_row(key, field) for key, field in _keys_of(model, prefix)]
    if not rows:
        return []
    title = f"`{prefix.rstrip('.')}`" if prefix else "Top level"
    doc = (model.__doc__ or "").strip()
    lines = [f"## {title}", ""]
    if doc:
        lines += [" ".join(doc.split()), ""]
    lines += ["| key | type | default | description | XTuner name |", "|---|---|---|---|---|", *rows, ""]
    return lines


def config_reference_markdown() -> str:
    """The whole page: intro, then one table per config section."""
    lines = ["# Configuration reference", "", _INTRO]
    for prefix, model in _sections(TrainConfig):
        lines += _section_markdown(prefix, model)
    return "\n".join(lines).rstrip("\n") + "\n"
