"""The prompt an adapter was trained with, as the default for chat, serve, web and eval with `--adapter`.

`tunesmith convert pth_to_hf` records the training template, system prompt and default-system rule in the
adapter folder (tunesmith.export.prompt_record). With `--adapter`, that template and system prompt are used
unless the user names others; a `--prompt-template` other than the trained one wins, with one warning line,
since a model answers in the layout it was trained on and may not stop in another. Adapters from other tools
carry no such record: the base model's rule applies (`auto` when its tokenizer has a chat template).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from tunesmith.data.templates import Template
from tunesmith.export.prompt_record import TrainedPrompt, read_trained_prompt

__all__ = ["TrainedPrompt", "choose_prompt", "read_trained_prompt"]


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
