"""How one tunesmith setting is looked up in a read XTuner config: the places it may be (a PART 1 variable, then
the structures built from it), the first one found taken and coerced, and a note for what is missing or unusable.
Which XTuner settings feed which tunesmith keys is mapping.py's part."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tunesmith.config.xtuner.evaluate import Call, ConfigModule, Opaque
from tunesmith.config.xtuner.fields import MISSING, Unreadable, dig, shortened

Candidate = tuple[str, Any]  # (where in the XTuner file, the value read there)


@dataclass(frozen=True)
class Reading:
    key: str  # tunesmith key, e.g. training.lr
    value: Any
    origin: str  # where in the XTuner file, e.g. lr or optim_wrapper.optimizer.lr

    @property
    def shown(self) -> str:
        """The value for a one-line report (long texts and lists abbreviated)."""
        return shortened(self.value)


class SettingLookup:
    """Looks settings up in the read module, collecting what was read (`read`, `settings`) and the notes."""

    def __init__(self, module: ConfigModule):
        self.names = module.names
        self.inherits = module.inherits
        self.read: list[Reading] = []
        self.notes: list[str] = []
        self.settings: dict[str, Any] = {}  # tunesmith key -> value read
        self.base: dict[str, Any] = {}  # the chosen recipe's full config, for the defaults named in notes

    # where a setting may be: a PART 1 variable, then the structures built from it
    def var(self, name: str) -> Candidate | None:
        return (name, self.names[name]) if name in self.names else None

    @staticmethod
    def at(label: str, root: Any, *keys: str) -> Candidate | None:
        value = dig(root, *keys)
        return None if value is MISSING else (label, value)

    def hf(self, key: str) -> Candidate | None:
        """A value of `training_args`, where framework='huggingface' files keep their training settings."""
        return self.at(f"training_args.{key}", self.names.get("training_args"), key)

    def default(self, key: str) -> Any:
        return dig(self.base, *key.split("."))

    def could_not_read(self, origin: str, raw: Opaque | Call, kept: str) -> None:
        self.notes.append(f"could not read {origin} = {raw.source} without running the file: {kept}")

    def could_not_use(self, origin: str, why: str, kept: str) -> None:
        self.notes.append(f"could not use {origin} ({why}): {kept}")

    def take(self, key: str, xtuner_name: str, candidates: list[Candidate | None],
             convert: Callable[[Any], Any], *, common: bool = True) -> Any:
        """Read `key` from the first candidate found; a missing (common) or unreadable one becomes a note."""
        kept = f"kept the recipe default for {key} ({self.default(key)!r})"
        found = [c for c in candidates if c is not None]
        if not found:
            if common:
                self.notes.append(f"no {xtuner_name} in the file: {kept}")
            return MISSING
        origin, raw = found[0]
        if isinstance(raw, (Opaque, Call)):
            self.could_not_read(origin, raw, kept)
            return MISSING
        try:
            value = convert(raw)
        except Unreadable as exc:
            self.could_not_use(origin, str(exc), kept)
            return MISSING
        self.settings[key] = value
        self.read.append(Reading(key, value, origin))
        return value

    def peek(self, candidates: list[Candidate | None], convert: Callable[[Any], Any]) -> Any:
        """A value needed to pick the recipe, read quietly (take() reads and reports it again later)."""
        for candidate in candidates:
            if candidate is not None:
                try:
                    return convert(candidate[1])
                except Unreadable:
                    return None
        return None
