"""Data pipeline: formats -> conversations -> templates -> ids + labels -> packed training batches.

Entry points: `build_train_dataset(cfg, tokenizer) -> (dataset, stats)` and
`make_dataloader(dataset, cfg, *, seed, epoch, rank=0, world_size=1, start_index=0)`; the modules' docstrings
document the rest (conversation, readers, templates, render, encode, pack, dataset, convert, check).
Imports are lazy so `import tunesmith.data` stays light (no torch until needed).
"""

from __future__ import annotations

from typing import Any

from tunesmith.data.conversation import Conversation, Turn
from tunesmith.data.templates import (
    AUTO,
    SYSTEM_TEMPLATES,
    Template,
    chat_template_jinja,
    get_system_template,
    get_template,
    system_template_names,
    template_names,
)

_LAZY = {
    "build_train_dataset": "tunesmith.data.dataset",
    "build_validation_dataset": "tunesmith.data.dataset",
    "DataStats": "tunesmith.data.dataset",
    "make_dataloader": "tunesmith.data.pack",
    "encode_conversation": "tunesmith.data.encode",
    "encode_prompt": "tunesmith.data.encode",
    "render_prompt_text": "tunesmith.data.render",
    "stop_words_for": "tunesmith.data.stopwords",
    "cut_at_stop": "tunesmith.data.stopwords",
    "IGNORE_INDEX": "tunesmith.data.encode",
    "read_records": "tunesmith.data.readers",
    "format_names": "tunesmith.data.readers",
    "get_format": "tunesmith.data.readers",
}

__all__ = ["AUTO", "SYSTEM_TEMPLATES", "Conversation", "Template", "Turn", "chat_template_jinja",
           "get_system_template", "get_template", "system_template_names", "template_names", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tunesmith.data' has no attribute {name!r}")
