"""The prompt an adapter was trained with, recorded in the folder `convert pth_to_hf` writes, and read back.

`tunesmith_meta.json` holds `"prompt": {"template", "system", "model_default_system"}`; folders converted before
the record existed only have the training config (`tunesmith_config.yaml`), read as a fallback. Adapters from
other tools have neither: `read_trained_prompt` says None. Used by chat / serve / eval (tunesmith.infer) and by
the Ollama Modelfile of `convert gguf`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.data.templates import Template, get_template, resolve_system

META_FILE = "tunesmith_meta.json"
CONFIG_FILE = "tunesmith_config.yaml"


@dataclass(frozen=True)
class TrainedPrompt:
    template: str
    system: str = ""
    model_default_system: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {"template": self.template, "system": self.system, "model_default_system": self.model_default_system}

    def as_template(self) -> Template:
        return get_template(self.template, model_default_system=self.model_default_system)


def prompt_record(cfg: Any) -> dict[str, Any]:
    """What a training config renders prompts with, as `tunesmith_meta.json` records it."""
    d = cfg.data
    return TrainedPrompt(d.prompt_template, resolve_system(d.system, d.system_template), d.model_default_system
                         ).as_dict()


def _from_config(folder: Path) -> TrainedPrompt | None:
    import yaml

    try:
        data = (yaml.safe_load((folder / CONFIG_FILE).read_text(encoding="utf-8")) or {}).get("data") or {}
        system = resolve_system(data.get("system") or "", data.get("system_template"))
        return TrainedPrompt(str(data.get("prompt_template", "internlm_chat")), system,
                             bool(data.get("model_default_system", True)))
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return None


def read_trained_prompt(folder: str | Path | None) -> TrainedPrompt | None:
    """The prompt recorded in a tunesmith adapter (or model) folder; None for none or one from another tool."""
    if not folder:
        return None
    folder = Path(folder)
    try:
        prompt = json.loads((folder / META_FILE).read_text(encoding="utf-8")).get("prompt")
    except (OSError, ValueError, AttributeError):
        prompt = None
    if isinstance(prompt, dict) and isinstance(prompt.get("template"), str):
        return TrainedPrompt(prompt["template"], str(prompt.get("system") or ""),
                             bool(prompt.get("model_default_system", True)))
    return _from_config(folder) if (folder / CONFIG_FILE).is_file() else None
