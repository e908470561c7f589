"""Write a config as fully explicit YAML with a comment on every key (what `copy-cfg` produces)."""

from __future__ import annotations

import json
from typing import Any

import yaml
from pydantic import BaseModel

from tunesmith.config.schema import TrainConfig

_HEADER = """\
# tunesmith training config: {name}
# Every key is shown with its value; edit what you need (at least model.path and data.path),
# then run:  tunesmith train {file}
# Any key can also be overridden on the command line:  --set training.lr=1e-4 data.max_length=1024
"""


def _scalar(value: Any) -> str:
    """One YAML scalar / flow collection on a single line."""
    if isinstance(value, str):
        # json quoting is valid YAML and keeps newlines, colons and unicode readable
        return json.dumps(value, ensure_ascii=False)
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10_000).strip()
    return text.removesuffix("\n...").strip()


def _lines(model: BaseModel, indent: int) -> list[str]:
    out: list[str] = []
    pad = "  " * indent
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        comment = f"  # {field.description}" if field.description else ""
        if isinstance(value, BaseModel):
            doc = (type(value).__doc__ or "").strip().splitlines()
            out.append("")
            out.append(f"{pad}{name}:" + (f"  # {doc[0]}" if doc and indent == 0 and doc[0] else ""))
            out.extend(_lines(value, indent + 1))
            continue
        dumped = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        if isinstance(dumped, tuple):
            dumped = list(dumped)
        if isinstance(dumped, list) and dumped and any(isinstance(v, str) and len(v) > 30 for v in dumped):
            out.append(f"{pad}{name}:{comment}")
            out.extend(f"{pad}  - {_scalar(item)}" for item in dumped)
        else:
            out.append(f"{pad}{name}: {_scalar(dumped)}{comment}")
    return out


def dump_config(cfg: TrainConfig, name: str = "config", file: str = "config.yaml") -> str:
    body = "\n".join(_lines(cfg, 0)).lstrip("\n")
    return _HEADER.format(name=name, file=file) + "\n" + body + "\n"
