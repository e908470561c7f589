"""MSAgent-Bench (ModelScope's agent data) as ReAct conversations, as XTuner's msagent_react_map_fn, with safe
parsing (JSON, never ``eval``): the ``<|startofthink|>`` form and the ReAct (iic/ms_agent) form, and the tool
preamble an agent shows its model (``msagent_system_prompt``, ``MSAGENT_PREAMBLE``, ``MSAGENT_RULES``)."""

from __future__ import annotations

import json
import re
from typing import Any

from tunesmith.data.conversation import RecordError, Turn

MSAGENT_PREAMBLE = "你是一个可以调用外部工具的助手，可以使用的工具包括：\n"
MSAGENT_RULES = (
    "如果使用工具请遵循以下格式回复：\n```\nThought:思考你当前步骤需要解决什么问题，是否需要使用工具\n"
    "Action:工具名称，你的工具必须从 [{names}] 选择\nAction Input:工具输入参数\n```\n工具返回按照以下格式回复：\n```\n"
    "Response:调用工具后的结果\n```\n如果你已经知道了答案，或者你不需要工具，请遵循以下格式回复\n```\n"
    "Thought:给出最终答案的思考过程\nFinal Answer:最终答案\n```\n开始!\n"
)
_THINK = re.compile(r"(.*?)<\|startofthink\|>(.*?)<\|endofthink\|>", re.DOTALL)
_EXEC = re.compile(r"<\|startofexec\|>(.*?)<\|endofexec\|>(.*)$", re.DOTALL)
_OBSERVATION = re.compile(r"^Observation:", re.MULTILINE)
_AFTER_OBS = re.compile(r"^(Thought:|Action:|Final Answer:)", re.MULTILINE)


def _json_block(text: str) -> Any:
    body = text.replace("```JSON", "").replace("```json", "").replace("```", "").replace("\n", "")
    return json.loads(body)


def _tool_objects(text: str) -> list[dict]:
    dec = json.JSONDecoder()
    found, pos = [], 0
    while (start := text.find("{", pos)) != -1:
        try:
            obj, end = dec.raw_decode(text, start)
        except ValueError:
            pos = start + 1
            continue
        if isinstance(obj, dict) and "name" in obj and "description" in obj:
            found.append(obj)
            pos = end
        else:
            pos = start + 1
    return found


def msagent_system_prompt(api: dict[str, str]) -> str:
    """XTuner's msagent_react tool preamble for `{tool name: description}` (chat agents use the same words)."""
    return MSAGENT_PREAMBLE + f"{api}\n" + MSAGENT_RULES.replace("{names}", str(list(api.keys())))


def _msagent_system(text: str) -> str:
    api: dict[str, str] = {}
    for obj in _tool_objects(text):
        api[obj["name"]] = obj["description"]
        try:
            params = {p["name"]: p["description"] for p in obj["paths"][0]["parameters"]}
            api[obj["name"]] += f"\n输入参数: {params}"
        except (KeyError, IndexError, TypeError):
            pass
    return msagent_system_prompt(api)


def _think_to_react(match: re.Match) -> str:
    out = f"Thought:{match.group(1).strip()}\n" if match.group(1).strip() else ""
    call = _json_block(match.group(2))
    return out + f"Action:{call['api_name']}\nAction Input:{call['parameters']}\n"


def _msagent_think_form(value: str, system: str, user: str) -> list[Turn]:
    exec_part = None
    if "<|startofexec|>" in value:
        value, rest = value.split("<|startofexec|>", 1)
        exec_part = "<|startofexec|>" + rest
    output, n = _THINK.subn(_think_to_react, value)
    output = f"{output}\n" if n else f"Final Answer:{output}\n"
    turns = [Turn(user, output, system)]
    if exec_part is not None:
        m = _EXEC.search(exec_part)
        if m:
            response = f"Response:{_json_block(m.group(1))}\n"
            answer = m.group(2).strip()
            if answer:  # the tool result sits in the non-loss system slot of an extra turn
                turns.append(Turn("", f"Final Answer:{answer}\n", response))
    return turns


def _msagent_react_form(value: str, system: str, user: str) -> list[Turn]:
    """The ReAct variant (iic/ms_agent): `Action: ...\\nAction Input: ...\\nObservation: <tool result>\\n
    Thought: ...\\nFinal Answer: ...`; each Observation goes into the non-loss system slot of the next turn."""
    turns: list[Turn] = []
    pos, slot_system, slot_input = 0, system, user
    for m in _OBSERVATION.finditer(value):
        if m.start() < pos:
            continue
        output = value[pos:m.start()]
        nxt = _AFTER_OBS.search(value, m.end())
        obs_end = nxt.start() if nxt else len(value)
        if not output.strip():
            raise RecordError("an Observation without a preceding Action")
        turns.append(Turn(slot_input, output, slot_system))
        slot_system, slot_input = value[m.start():obs_end], ""
        pos = obs_end
    tail = value[pos:]
    if tail.strip():
        turns.append(Turn(slot_input, tail if tail.endswith("\n") else tail + "\n", slot_system))
    return turns


def msagent_react_map_fn(rec: Any) -> list[Turn]:
    """MSAgent-Bench conversations (a list or its JSON string) in both forms: `<|startofthink|>...
    <|startofexec|>` (converted to ReAct as XTuner does) and the ReAct `iic/ms_agent` form."""
    if not isinstance(rec, dict) or "conversations" not in rec:
        found = ", ".join(repr(k) for k in rec) if isinstance(rec, dict) else type(rec).__name__
        raise RecordError(f"missing column 'conversations' (found: {found or 'none'})")
    conv = rec["conversations"]
    if isinstance(conv, str):
        try:
            conv = json.loads(conv)
        except json.JSONDecodeError as exc:
            raise RecordError(f"'conversations' is not valid JSON ({exc.msg})") from None
    if not isinstance(conv, list) or len(conv) < 2:
        raise RecordError("'conversations' needs at least a user and an assistant message")
    for i, m in enumerate(conv):
        if not isinstance(m, dict) or "from" not in m or not isinstance(m.get("value"), str):
            raise RecordError(f"message {i + 1} must be an object with 'from' and a text 'value'")
    think_form = any("<|startofthink|>" in m["value"] or "<|startofexec|>" in m["value"] for m in conv)
    turns: list[Turn] = []
    system, user = "", ""
    for i, m in enumerate(conv):
        role, value = m["from"], m["value"]
        if role == "system":  # the think form gets XTuner's tool preamble; the ReAct form is kept as written
            system += _msagent_system(value) if think_form else value
        elif role == "user":
            user += f"{value}\n"
        elif role == "assistant":
            try:
                if "<|startofthink|>" in value or "<|startofexec|>" in value:
                    turns += _msagent_think_form(value, system, user)
                else:
                    turns += _msagent_react_form(value, system, user)
            except (ValueError, KeyError, TypeError) as exc:
                raise RecordError(f"message {i + 1}: cannot parse the tool call ({exc})") from None
            system, user = "", ""
        else:
            raise RecordError(f"message {i + 1}: unknown 'from' {role!r} (system, user or assistant)")
    if not turns:
        raise RecordError("no assistant message")
    return turns
