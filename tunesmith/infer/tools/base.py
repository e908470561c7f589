"""The tool protocol shared by the agent and the plugins."""

from __future__ import annotations

from typing import Protocol


class ToolError(Exception):
    """A tool could not answer; the message is shown to the model as the observation."""


class Tool(Protocol):
    name: str  # what the model writes after "Action:"
    description: str  # one line for the system prompt
    example: str  # an example "Action Input"

    def run(self, text: str) -> str: ...


def strip_quotes(text: str) -> str:
    """A tool input as the model wrote it, without surrounding whitespace and one pair of enclosing quotes."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1]
    return text
