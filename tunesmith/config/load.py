"""Read a config (YAML file or built-in recipe name), apply `--set a.b=c` overrides, validate.

All problems become one-line `TunesmithError`s naming the file and the key, with a did-you-mean for
misspelt keys.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tunesmith.config.overrides import apply_overrides
from tunesmith.config.recipes import recipe_names, recipe_settings
from tunesmith.config.schema import TrainConfig
from tunesmith.errors import TunesmithError, did_you_mean


def _field_names(model: type[BaseModel], path: tuple[str | int, ...]) -> list[str]:
    """The valid keys at a location in the schema, for did-you-mean."""
    current: Any = model
    for part in path:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = field.annotation
    return list(getattr(current, "model_fields", {}))


def _describe(error: dict[str, Any], source: str) -> TunesmithError:
    loc = tuple(error.get("loc", ()))
    key = ".".join(str(p) for p in loc) or "(top level)"
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        valid = _field_names(TrainConfig, loc[:-1])
        hint = did_you_mean(str(loc[-1]), valid) or f"valid keys here: {', '.join(valid)}"
        return TunesmithError(f"{source}: unknown config key {key!r}", hint)
    msg = error.get("msg", "invalid value")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if kind == "model_type":
        return TunesmithError(f"{source}: {key} must be a mapping of keys, got {error.get('input')!r}")
    where = f"{source}: " if not loc else f"{source}: {key}: "
    given = error.get("input")
    shown = "" if isinstance(given, dict) or given is None else f" (got {given!r})"
    return TunesmithError(f"{where}{msg}{shown}", "fix the value in the YAML or with --set key=value")


def validate(data: dict[str, Any], source: str) -> TrainConfig:
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise _describe(exc.errors()[0], source) from exc


def read_yaml(path: Path) -> dict[str, Any]:
    if path.suffix == ".py":
        out = path.with_suffix(".yaml")
        raise TunesmithError(
            f"{path} is an XTuner Python config: tunesmith reads YAML configs and never runs a config's code",
            f"convert it with `tunesmith convert xtuner-config {path} {out}`, then `tunesmith train {out}` "
            "(or start from a built-in recipe: `tunesmith copy-cfg NAME .`)",
        )
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TunesmithError(f"cannot read config {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "malformed YAML"
        raise TunesmithError(f"{path}{where}: {problem}", "check indentation and quoting on that line") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TunesmithError(f"{path}: a config must be a mapping of sections, got {type(data).__name__}")
    return data


def load_config(name_or_path: str, overrides: list[str] | None = None) -> tuple[TrainConfig, str]:
    """Load a YAML file or a built-in recipe name, apply the overrides, validate once. Returns (config, stem for
    the default work dir)."""
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml", ".py"} or path.exists():
        if not path.is_file():
            raise TunesmithError(
                f"config file {path} does not exist",
                "pass a YAML path or a recipe name from `tunesmith list-cfg`",
            )
        data, source, stem = read_yaml(path), str(path), path.stem
    elif name_or_path in recipe_names():
        data, source, stem = recipe_settings(name_or_path), name_or_path, name_or_path
    else:
        hint = did_you_mean(name_or_path, recipe_names()) or "run `tunesmith list-cfg` to see the recipes"
        raise TunesmithError(f"unknown config {name_or_path!r} (not a file, not a recipe)", hint)
    data = apply_overrides(data, overrides)
    return validate(data, source), stem


def build_recipe(name: str) -> TrainConfig:
    """The built-in recipe ``name`` as a validated config."""
    return validate(recipe_settings(name), name)


def default_work_dir(cfg: TrainConfig, config_name: str | None = None) -> Path:
    """Where a run writes: ``work_dir`` of the config, else ``work_dirs/<config name>`` (the YAML file's stem or
    the recipe's name), else ``work_dirs/run``."""
    return Path(cfg.work_dir) if cfg.work_dir else Path("work_dirs") / (config_name or "run")


_NOT_THE_RUN = {"work_dir": True, "logging": True, "evaluation": True}  # where it writes, what it reports


def config_hash(cfg: TrainConfig) -> str:
    """A stable hash of what decides the training run (checkpoints carry it; resuming compares it)."""
    relevant = cfg.model_dump(mode="json", exclude=_NOT_THE_RUN)
    blob = json.dumps(relevant, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def flat_settings(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A config (or its dumped dict) as {"section.key": value}."""
    if isinstance(tree, TrainConfig):
        tree = tree.model_dump(mode="json")
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flat_settings(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def run_settings(data: dict[str, Any] | TrainConfig) -> dict[str, Any] | None:
    """The flat settings that decide a run (those config_hash covers), the schema's defaults filled in; None
    when `data` does not validate (a config of an older schema)."""
    try:
        cfg = data if isinstance(data, TrainConfig) else TrainConfig.model_validate(data)
    except ValidationError:
        return None
    return flat_settings(cfg.model_dump(mode="json", exclude=_NOT_THE_RUN))
