"""`--set a.b=c` overrides on plain settings (validation happens afterwards, with the schema)."""

from __future__ import annotations

from typing import Any

import yaml

from tunesmith.errors import TunesmithError


def parse_override(item: str) -> tuple[list[str], Any]:
    """'training.lr=1e-4' -> (['training', 'lr'], 0.0001). Values are read as YAML scalars / lists."""
    if "=" not in item:
        raise TunesmithError(f"override {item!r} has no '='", "write overrides as key=value, e.g. training.lr=1e-4")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise TunesmithError(f"override {item!r} has an empty key", "write overrides as key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def set_dotted(data: dict[str, Any], dotted: str | list[str], value: Any) -> None:
    """data['a']['b'] = value for 'a.b', creating the intermediate mappings."""
    path = dotted.split(".") if isinstance(dotted, str) else dotted
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply `key=value` strings to a plain dict (validation happens afterwards, with the schema)."""
    for item in overrides or []:
        path, value = parse_override(item)
        set_dotted(data, path, value)
    return data
