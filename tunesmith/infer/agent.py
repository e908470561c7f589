"""A ReAct agent in the format msagent_react training produces (`--lagent`).

The model answers with ``Thought: ... / Action: <tool> / Action Input: <input>`` and ends its turn, or with
``Final Answer: ...``. The tool's result goes back as a new turn whose non-loss system text is
``Response:<result>\\n`` and whose input is empty — exactly the layout `msagent_react_map_fn` gives the
training data (tunesmith.data.readers), rendered by the same template. The system prompt lists the tools in
the same words as the training data's preamble.

Malformed output (an unknown tool, an Action without an Action Input, a tool error) is fed back to the model as
the Response, so it can correct itself; plain text without an Action is taken as the answer; after
`max_steps` tool calls the agent stops and says so. Every step is reported through `on_step`.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tunesmith.infer.session import ChatSession
from tunesmith.infer.tools.base import Tool, ToolError

# what a tool-call turn may run into when the model keeps writing past its Action Input
OBSERVATION_WORDS = ("Response:", "Observation:")

_FINAL = re.compile(r"Final\s*Answer\s*[:：]\s*(.*)", re.DOTALL | re.IGNORECASE)
_ACTION = re.compile(r"^\s*Action\s*[:：][ \t]*(.*)$", re.MULTILINE | re.IGNORECASE)
_INPUT = re.compile(r"Action\s*Input\s*[:：][ \t]*(.*)", re.DOTALL | re.IGNORECASE)
_THOUGHT = re.compile(r"Thought\s*[:：]\s*(.*?)(?=^\s*(?:Action|Final\s*Answer)\s*[:：]|\Z)",
                      re.DOTALL | re.IGNORECASE | re.MULTILINE)

def system_prompt(tools: Sequence[Tool]) -> str:
    """The tool preamble in the words msagent_react training uses: the data module builds both, so the prompt
    the agent sees cannot drift from the one it was trained on."""
    from tunesmith.data.msagent import msagent_system_prompt

    return msagent_system_prompt({t.name: f"{t.description}\n输入参数: {{'input': '{t.example}'}}" for t in tools})


@dataclass
class Step:
    """One model turn: what it thought, which tool it called with what, and the result (or the answer)."""

    thought: str = ""
    action: str = ""
    action_input: str = ""
    response: str = ""
    final_answer: str | None = None
    raw: str = ""
    error: bool = False


@dataclass
class AgentResult:
    answer: str
    steps: list[Step] = field(default_factory=list)
    finished: bool = True  # False: stopped at max_steps


def parse_step(text: str) -> Step:
    """Parse one model turn in the ReAct format (tolerant to spacing, case and full-width colons)."""
    step = Step(raw=text)
    thought = _THOUGHT.search(text)
    if thought:
        step.thought = thought.group(1).strip()
    action = _ACTION.search(text)
    final = _FINAL.search(text)
    if final and (not action or final.start() < action.start()):
        step.final_answer = final.group(1).strip()
        return step
    if action:
        step.action = action.group(1).strip()
        rest = text[action.end():]
        given = _INPUT.search(rest)
        if given:
            step.action_input = given.group(1).strip()
        else:
            step.action_input = ""
            step.error = True
    return step


def tool_argument(text: str) -> str:
    """The tool's text argument from an Action Input: a plain string, or a JSON / Python-literal dict with one
    value (msagent writes `{'query': '...'}`). Parsed with json / ast.literal_eval, never eval."""
    text = text.strip()
    if text.startswith("```"):
        return text
    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, dict) and value:
            for key in ("input", "query", "expression", "equation", "code", "q", "text"):
                if key in value:
                    return str(value[key])
            return str(next(iter(value.values())))
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)):
            return str(value)
    return text


class ReActAgent:
    def __init__(
        self,
        session: ChatSession,
        tools: Sequence[Tool],
        *,
        max_steps: int = 6,
        on_step: Callable[[int, Step], None] | None = None,
        set_system: bool = True,
    ):
        self.session = session
        self.tools = {t.name.lower(): t for t in tools}
        self.max_steps = max_steps
        self.on_step = on_step
        if set_system:
            session.system = system_prompt(tools)

    def _call(self, step: Step) -> str:
        name = step.action.strip().strip("`'\"").lower()
        tool = self.tools.get(name)
        if tool is None:
            step.error = True
            return f"unknown tool {step.action!r}; the tools are {list(self.tools)}"
        if step.error and not step.action_input:
            return "the Action has no Action Input; write 'Action Input:' and the input on the next line"
        try:
            return tool.run(tool_argument(step.action_input))
        except ToolError as exc:
            step.error = True
            return f"error: {exc}"
        except Exception as exc:  # noqa: BLE001 - whatever a tool does with a model's input, the loop goes on
            step.error = True
            return f"error: the tool failed ({type(exc).__name__}: {str(exc)[:300]})"

    def run(self, question: str, *, on_text: Callable[[str], None] | None = None) -> AgentResult:
        steps: list[Step] = []
        user, system = question, ""
        for n in range(1, self.max_steps + 2):
            self.session.begin_turn(user, system=system)
            result = self.session.generate(stop_words=OBSERVATION_WORDS, on_text=on_text)
            self.session.end_turn()
            step = parse_step(result.text)
            steps.append(step)
            if step.final_answer is not None or not step.action:
                if step.final_answer is None:  # plain text: the model answered without the format
                    step.final_answer = result.text.strip()
                if self.on_step:
                    self.on_step(n, step)
                return AgentResult(step.final_answer, steps)
            if n > self.max_steps:
                step.response = "(not run: step limit reached)"
                if self.on_step:
                    self.on_step(n, step)
                break
            step.response = self._call(step)
            if self.on_step:
                self.on_step(n, step)
            user, system = "", f"Response:{step.response}\n"
        return AgentResult(f"[stopped after {self.max_steps} tool calls without a final answer]", steps, False)


def format_step(n: int, step: Step) -> str:
    """How the CLI shows a step."""
    lines = [f"[step {n}]"]
    if step.thought:
        lines.append(f"Thought: {step.thought}")
    if step.action:
        lines.append(f"Action: {step.action}")
        lines.append(f"Action Input: {step.action_input}")
        lines.append(f"Response: {step.response}")
    if step.final_answer is not None:
        lines.append(f"Final Answer: {step.final_answer}")
    return "\n".join(lines)
