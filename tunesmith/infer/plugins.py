"""MOSS-style plugins (`--with-plugins calculate solve search`), for models fine-tuned with the moss_sft
templates (XTuner's `moss_003_sft_plugins` recipes).

The flow, as in XTuner: generate until the command stop word `<eoc>`; take the commands written after
`<|Commands|>:` (e.g. ``Calculate("2+3*4")``, ``Solve("x^2=4")``, ``Search("...")``); run them; append
``<|Results|>:\\n...\\n<eor>\\n`` to the reply; generate again until the answer stop word `<eom>`. The model's own
ids (including `<eoc>`) stay in the history.

Unlike XTuner, the system prompt really marks the plugins that are not enabled as disabled (XTuner's
`str.replace` results were discarded), and each enabled plugin is matched by its own name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from tunesmith.errors import TunesmithError
from tunesmith.infer.session import ChatSession
from tunesmith.infer.tools.base import ToolError
from tunesmith.infer.tools.calculator import Calculator
from tunesmith.infer.tools.solver import Solver

PLUGINS = ("calculate", "solve", "search")
COMMAND_STOP = "<eoc>"
ANSWER_STOP = "<eom>"
_SYSTEM_LINES = {
    "search": "- Web search: enabled. API: Search(query)",
    "calculate": "- Calculator: enabled. API: Calculate(expression)",
    "solve": "- Equation solver: enabled. API: Solve(equation)",
}
_COMMANDS = re.compile(r"<\|Commands\|>\s*:(.*?)(?:<eoc>|$)", re.DOTALL)
_CALL = re.compile(r"(Calculate|Solve|Search)\s*\(\s*(\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|[^)]*)\s*\)")


def check_plugin_setup(plugins: Sequence[str], prompt_template: str | None, system_template: str | None) -> None:
    unknown = [p for p in plugins if p not in PLUGINS]
    if unknown:
        raise TunesmithError(f"unknown plugin {unknown[0]!r} for --with-plugins", f"choose from: {' '.join(PLUGINS)}")
    if prompt_template != "moss_sft" or system_template != "moss_sft":
        raise TunesmithError(
            "--with-plugins works only with the MOSS templates the plugin models were trained with",
            "add --prompt-template moss_sft --system-template moss_sft",
        )


def plugin_system_text(system: str, enabled: Sequence[str]) -> str:
    """The moss_sft system text with the plugins that are not enabled marked disabled."""
    for name, line in _SYSTEM_LINES.items():
        if name not in enabled:
            system = system.replace(line, line.split(": enabled.")[0] + ": disabled.")
    return system


def _unquote(arg: str) -> str:
    arg = arg.strip()
    if len(arg) >= 2 and arg[0] == arg[-1] and arg[0] in "\"'":
        arg = arg[1:-1].replace('\\"', '"').replace("\\'", "'")
    return arg


class MossPlugins:
    def __init__(self, session: ChatSession, enabled: Sequence[str], *, search=None):
        self.session = session
        self.enabled = set(enabled)
        self.search = search  # a WebSearch (needs SERPER_API_KEY) when "search" is enabled
        # the tools' run(): bounded in time and memory, whatever the model writes
        self.handlers: dict[str, Callable[[str], str]] = {"Calculate": Calculator().run, "Solve": Solver().run}
        if search is not None:
            self.handlers["Search"] = search.run

    def run_commands(self, text: str) -> str:
        lines = []
        for match in _CALL.finditer(text):
            api, arg = match.group(1), _unquote(match.group(2))
            plugin = {"Calculate": "calculate", "Solve": "solve", "Search": "search"}[api]
            if plugin not in self.enabled or api not in self.handlers:
                result = f"{api} is disabled"
            else:
                try:
                    result = self.handlers[api](arg)
                except ToolError as exc:
                    result = f"error: {exc}"
                except Exception as exc:  # noqa: BLE001 - a model's input must never end the chat
                    result = f"error: the plugin failed ({type(exc).__name__}: {str(exc)[:300]})"
            lines.append(f'{api}("{arg}") => {result}')
        return "\n".join(lines) if lines else "None"

    def ask(self, text: str, *, on_text: Callable[[str], None] | None = None, on_results=None) -> str:
        session = self.session
        session.begin_turn(text)
        first = session.generate(on_text=on_text, keep_stop=True)
        reply = first.text
        if first.stop == COMMAND_STOP:
            found = _COMMANDS.findall(session.reply_so_far)
            commands = found[-1] if found else ""
            if commands.strip() and commands.strip() != "None":
                results = f"\n<|Results|>:\n{self.run_commands(commands)}\n<eor>\n"
                if on_results:
                    on_results(results)
                session.add_to_reply(results)
                second = session.generate(on_text=on_text, keep_stop=True)
                reply = reply + results + second.text
            else:  # no command: let the model go on to its answer
                second = session.generate(on_text=on_text, keep_stop=True)
                reply += second.text
        session.end_turn()
        return reply
