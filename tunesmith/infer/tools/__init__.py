"""Tools the agent (`--lagent`) and the MOSS plugins (`--with-plugins`) can call.

A tool is a small object with a `name`, a one-line `description`, an `example` input, and `run(text) -> str`.
A failure the model can react to (bad input, a network error, a time-out) raises `ToolError`; its message
is fed back to the model as the observation instead of ending the conversation.
"""

from __future__ import annotations

from tunesmith.infer.tools.base import Tool, ToolError
from tunesmith.infer.tools.calculator import Calculator, calculate
from tunesmith.infer.tools.python_exec import PythonInterpreter
from tunesmith.infer.tools.search import WebSearch
from tunesmith.infer.tools.solver import Solver, solve

__all__ = [
    "Tool",
    "ToolError",
    "Calculator",
    "Solver",
    "WebSearch",
    "PythonInterpreter",
    "calculate",
    "solve",
    "build_tools",
]


def build_tools(
    names=("search", "calculate", "solve"), *, allow_python: bool = False, search_kwargs=None
) -> list[Tool]:
    """Instantiate tools by name: search, calculate, solve (and python when `allow_python`)."""
    factories = {
        "search": lambda: WebSearch(**(search_kwargs or {})),
        "calculate": Calculator,
        "solve": Solver,
        "python": PythonInterpreter,
    }
    tools: list[Tool] = []
    for name in names:
        if name not in factories:
            from tunesmith.errors import unknown_name_error

            raise unknown_name_error("tool", name, factories)
        tools.append(factories[name]())
    if allow_python and "python" not in names:
        tools.append(PythonInterpreter())
    return tools
