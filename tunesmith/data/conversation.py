"""The one internal record: a conversation is a list of `Turn`s (XTuner's `{"conversation": [...]}` format).

`Turn(input, output, system="", output_with_loss=True)`: `system` is a non-loss text rendered before the
turn's instruction (the first turn's system prompt, or a tool result in the msagent ReAct format), `input`
the user message (prompt side, never trained on), `output` the reply (trained on unless
`output_with_loss=False`). A preference pair is a conversation whose last turn also carries `rejected`, the worse
answer to the same prompt (`output` is the chosen one).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

Conversation = list["Turn"]


class RecordError(ValueError):
    """This record cannot be used (the message says why; the caller adds file and line)."""


class SkipRecord(ValueError):
    """This record is dropped on purpose by its format (counted with the reason)."""


@dataclass(frozen=True)
class Turn:
    input: str
    output: str
    system: str = ""
    output_with_loss: bool = True
    rejected: str | None = None  # preference pairs: the rejected answer of the last turn (output is the chosen)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.system:
            out["system"] = self.system
        out["input"] = self.input
        out["output"] = self.output
        if not self.output_with_loss:
            out["output_with_loss"] = False
        if self.rejected is not None:
            out["chosen"] = out.pop("output")
            out["rejected"] = self.rejected
        return out


def conversation_to_json(turns: Iterable[Turn]) -> dict[str, Any]:
    """`{"conversation": [{system?, input, output}, ...]}`: one line of a conversation JSONL file."""
    return {"conversation": [t.to_json() for t in turns]}


def with_default_system(turns: Sequence[Turn], system: str) -> list[Turn]:
    """Put `system` on the first turn unless that turn carries its own system text."""
    turns = list(turns)
    if not system or not turns or turns[0].system:
        return turns
    return [replace(turns[0], system=system), *turns[1:]]
