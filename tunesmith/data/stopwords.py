"""Where a reply ends: the stop words of a template and tokenizer, and the text before the first of them.

Training's evaluation prompts cut their answers with :func:`cut_at_stop`; chat and the server cut streamed text
incrementally (``infer.stops.StopMatcher``), to the same place.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tunesmith.data.templates import Template, get_template


def stop_words_for(template: Template | str, tokenizer: Any) -> list[str]:
    """Words that end a reply: the template's STOP_WORDS plus the tokenizer's EOS."""
    t = get_template(template) if isinstance(template, str) else template
    words = list(t.stop_words)
    if tokenizer.eos_token and tokenizer.eos_token not in words:
        words.append(tokenizer.eos_token)
    return words


def cut_at_stop(text: str, stop_words: Iterable[str]) -> str:
    """``text`` up to the earliest occurrence of any stop word (all of it when none occurs)."""
    ends = [i for i in (text.find(w) for w in stop_words if w) if i >= 0]
    return text[: min(ends)] if ends else text
