"""OpenAI-style chat messages -> turns: one rule for training records and for the prompt a server answers.

Roles first go through :func:`normalize_role` (``human`` / ``gpt`` / ``function`` / ``developer`` ... become
system, user, assistant or tool). Then, as XTuner's ``openai_map_fn``: system text attaches to the next turn,
consecutive user and tool contents join with a newline into that turn's input, each assistant message closes a
turn (leading assistant messages, before any user message, are skipped). For training a trailing unanswered
user message is dropped and an empty answer is an error; ``to_answer=True`` keeps the trailing user message as
the last turn, with an empty output: the turn to generate.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from tunesmith.data.conversation import RecordError, Turn
from tunesmith.data.fields import as_bool

ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "human": "user",
                "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "function_call": "assistant",
                "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool"}


def normalize_role(role: object) -> str | None:
    """The role a message plays (system, user, assistant, tool), or None for one this rule does not know."""
    return ROLE_ALIASES.get(str(role).lower())


def read_messages(msgs: Sequence, *, name: str = "") -> list[tuple[str, str, bool]]:
    """A record's message objects as ``(role, content, loss)`` (``loss`` from a message's optional "loss" key);
    ``name`` (e.g. "'chosen' ") starts the error messages, which number the messages from 1."""
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m:
            raise RecordError(f"{name}message {i + 1} must be an object with 'role' and 'content'")
        role = normalize_role(m["role"])
        if role is None:
            raise RecordError(f"{name}message {i + 1}: unknown role {m['role']!r} (use system, user, assistant "
                              "or tool)")
        out.append((role, message_content(m, i), as_bool(m.get("loss", True), "loss")))
    return out


def message_content(msg: dict, i: int) -> str:
    """A message's text: plain, the text parts of a part list, or its tool calls as JSON."""
    content = msg.get("content")
    if content is None:
        content = ""
    if isinstance(content, list):  # [{"type": "text", "text": ...}]
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if not isinstance(content, str):
        raise RecordError(f"message {i + 1}: 'content' must be text")
    if msg.get("tool_calls") and not content.strip():
        content = json.dumps(msg["tool_calls"], ensure_ascii=False)
    return content


def messages_to_turns(messages: Sequence[tuple[str, str, bool]], *, to_answer: bool = False) -> list[Turn]:
    """``(role, content, loss)`` messages with normalized roles -> turns (module docstring)."""
    turns: list[Turn] = []
    system, inputs = "", []
    seen_user = False
    for role, content, loss in messages:
        if role == "system":
            system += content  # as the exported chat_template does: no separator
        elif role in ("user", "tool"):
            inputs.append(content)
            seen_user = True
        elif role == "assistant":
            if not seen_user:
                continue
            if not content.strip() and not to_answer:
                raise RecordError(f"empty assistant message in turn {len(turns) + 1}")
            turns.append(Turn("\n".join(inputs), content, system, loss))
            system, inputs = "", []
    if to_answer:
        if not inputs:
            raise RecordError("the last message must be from the user (or a tool): there is nothing to answer")
        turns.append(Turn("\n".join(inputs), "", system))
    elif not turns:
        raise RecordError("no user message answered by an assistant message")
    return turns
