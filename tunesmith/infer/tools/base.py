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
