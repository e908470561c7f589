"""Finding settings in the values read from an XTuner config, and coercing them to what tunesmith's keys take.

A coercer (`as_int`, `as_optimizer`, ...) returns the value or raises `Unreadable` with a message that says why,
which the converter turns into a note.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Iterator
from typing import Any

from tunesmith.config.xtuner.evaluate import Call, Opaque, Symbol, is_number

MISSING = object()  # a key the structure does not have (None is a value a config can give)
_SHORT = reprlib.Repr()  # values quoted in notes: long or deeply nested ones abbreviated
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict = 60, 60, 4, 4


def shortened(value: Any) -> str:
    """`value` for a one-line note or report, long texts and lists abbreviated."""
    return _SHORT.repr(value)


def dig(value: Any, *keys: str) -> Any:
    """value[key1][key2]... through nested dicts, or MISSING where a key is not there."""
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return MISSING
        value = value[key]
    return value


def dicts_in(value: Any, seen: set[int] | None = None) -> Iterator[dict[Any, Any]]:
    """Every dict inside `value`, depth first (each once, even where the config made a cycle)."""
    seen = set() if seen is None else seen
    if isinstance(value, (dict, list, tuple)):
        if id(value) in seen:
            return
        seen.add(id(value))
        if isinstance(value, dict):
            yield value
        for child in value.values() if isinstance(value, dict) else value:
            yield from dicts_in(child, seen)


def dicts_of_type(value: Any, *type_names: str) -> list[dict[Any, Any]]:
    """The dicts inside `value` whose `type` is one of these class / function names."""
    return [d for d in dicts_in(value) if isinstance(d.get("type"), Symbol) and d["type"].leaf in type_names]


class Unreadable(Exception):
    """A value was found but is not one tunesmith can use; the message says why."""


def describe(value: Any) -> str:
    """What `value` is, for a note that says why it cannot be used."""
    if isinstance(value, (Opaque, Call)):
        return f"`{value.source}`, which is not read without running the file"
    if isinstance(value, Symbol):
        return f"the name {value.path}"
    return shortened(value)


def as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise Unreadable(f"it is {describe(value)}, not a string")


def as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise Unreadable(f"it is {describe(value)}, not True or False")


def as_float(value: Any) -> float:
    if is_number(value) and math.isfinite(value):
        return float(value)
    raise Unreadable(f"it is {describe(value)}, not a number")


def as_int(value: Any) -> int:
    if is_number(value) and float(value).is_integer():
        return int(value)
    raise Unreadable(f"it is {describe(value)}, not a whole number")


def as_optional_int(value: Any) -> int | None:
    return None if value is None else as_int(value)


def as_limit(value: Any) -> int | None:
    """save_steps / save_total_limit: XTuner's -1 (and None) mean never / unlimited, tunesmith's null."""
    number = None if value is None else as_int(value)
    return None if number is None or number <= 0 else number


def as_texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise Unreadable(f"it is {describe(value)}, not a list of strings")


def as_betas(value: Any) -> list[float]:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return [as_float(v) for v in value]
    raise Unreadable(f"it is {describe(value)}, not a pair of numbers")


def first_file(value: Any) -> str:
    """`data_files` as XTuner passes it to load_dataset: a path, a list of paths or {split: path(s)}."""
    if isinstance(value, dict) and not isinstance(value, Call) and value:
        return first_file(value.get("train", next(iter(value.values()))))
    if isinstance(value, (list, tuple)) and value:
        return first_file(value[0])
    return as_text(value)


_OPTIMIZERS = {"AdamW": "adamw", "AdamW32bit": "adamw", "AdamW8bit": "adamw_8bit", "PagedAdamW": "paged_adamw_32bit",
               "PagedAdamW32bit": "paged_adamw_32bit", "PagedAdamW8bit": "paged_adamw_8bit"}
_DTYPES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32", "float": "fp32"}


def as_optimizer(value: Any) -> str:
    if isinstance(value, Symbol) and value.leaf in _OPTIMIZERS:
        return _OPTIMIZERS[value.leaf]
    raise Unreadable(f"it is {describe(value)}; tunesmith trains with {', '.join(sorted(set(_OPTIMIZERS.values())))}")


def as_dtype(value: Any) -> str:
    name = value.leaf if isinstance(value, Symbol) else value
    if isinstance(name, str) and name in _DTYPES:
        return _DTYPES[name]
    raise Unreadable(f"it is {describe(value)}, not a torch dtype")


def symbol_name(value: Any, suffix: str = "") -> str:
    """`PROMPT_TEMPLATE.internlm_chat` -> 'internlm_chat', `oasst1_map_fn` -> 'oasst1' (suffix '_map_fn')."""
    if isinstance(value, Symbol):
        return value.leaf.removesuffix(suffix) if suffix else value.leaf
    if isinstance(value, str):
        return value
    raise Unreadable(f"it is {describe(value)}, not a name")
