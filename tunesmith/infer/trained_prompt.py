"""The prompt an adapter was trained with, as the default for chat, serve, web and eval with `--adapter`.

`tunesmith convert pth_to_hf` writes the training template, system prompt and default-system rule into the
adapter folder (`tunesmith_meta.json` "prompt"; older folders only have `tunesmith_config.yaml`, read as a
fallback). With `--adapter`, that template and system prompt are used unless the user names others; a
`--prompt-template` other than the trained one wins, with one warning line, since a model answers in the
layout it was trained on and may not stop in another. Adapters from other tools carry no such record:
the base model's rule applies (`auto` when its tokenizer has a chat template).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.data.templates import Template, get_template

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


def _from_config(folder: Path) -> TrainedPrompt | None:
    import yaml

    from tunesmith.data.templates import resolve_system

    try:
        data = (yaml.safe_load((folder / CONFIG_FILE).read_text(encoding="utf-8")) or {}).get("data") or {}
        system = resolve_system(data.get("system") or "", data.get("system_template"))
        return TrainedPrompt(str(data.get("prompt_template", "internlm_chat")), system,
                             bool(data.get("model_default_system", True)))
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return None


def read_trained_prompt(adapter: str | Path | None) -> TrainedPrompt | None:
    """The prompt recorded in a tunesmith adapter folder; None for no adapter or one from another tool."""
    if not adapter:
        return None
    folder = Path(adapter)
    try:
        prompt = json.loads((folder / META_FILE).read_text(encoding="utf-8")).get("prompt")
    except (OSError, ValueError, AttributeError):
        prompt = None
    if isinstance(prompt, dict) and isinstance(prompt.get("template"), str):
        return TrainedPrompt(prompt["template"], str(prompt.get("system") or ""),
                             bool(prompt.get("model_default_system", True)))
    return _from_config(folder) if (folder / CONFIG_FILE).is_file() else None


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def choose_prompt(adapter: str | Path | None, prompt_template: str | Template | None, system: str, *,
                  warn: Callable[[str], None] = _warn) -> tuple[str | Template | None, str]:
    """(template, system) for a session: the user's choice, else what the adapter was trained with."""
    trained = read_trained_prompt(adapter)
    if trained is None:
        return prompt_template, system
    system = system or trained.system
    if prompt_template is None:
        return trained.as_template(), system
    name = prompt_template.name if isinstance(prompt_template, Template) else prompt_template
    if name == trained.template:
        return trained.as_template(), system
    warn(f"warning: --prompt-template {name} differs from the template the adapter was trained with "
         f"({trained.template}); replies may not follow the trained format or stop (drop the flag to use it)")
    return prompt_template, system
