"""Readers: one function per dataset format, from a raw record to a conversation, and their registry.

Raw records (with file and line) come from `tunesmith.data.sources` (files, folders, hub datasets).

Formats (XTuner's `dataset_map_fn` names): `FORMATS[name] = DatasetFormat(name, map_fn, description, kind)`;
`map_fn(record) -> list[Turn]` raises `RecordError` (bad record: the caller names file and line) or
`SkipRecord` (dropped on purpose, e.g. alpaca `<nooutput>`, counted with its reason).
`msagent_system_prompt(api)`, `MSAGENT_PREAMBLE`, `MSAGENT_RULES`: the ReAct tool preamble (for agents).

Public API: `format_names()`, `get_format(name)`, `read_records(path, fmt, ...) -> (list[Record], ReadStats)`
(raises `TunesmithError` at the first bad record, naming file and line), `check_records(...)` (collects every
problem instead).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tunesmith.data.conversation import Turn
from tunesmith.data.sources import RawRecord, iter_raw  # noqa: F401  (RawRecord: re-exported)
from tunesmith.data.templates import SYSTEM_TEMPLATES
from tunesmith.errors import TunesmithError, unknown_name_error


class RecordError(ValueError):
    """This record cannot be used (the message says why; the caller adds file and line)."""


class SkipRecord(ValueError):
    """This record is dropped on purpose by its format (counted with the reason)."""


@dataclass(frozen=True)
class Record:
    turns: tuple[Turn, ...]
    where: str
    line: int


@dataclass
class ReadStats:
    records_read: int = 0
    conversations: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    turns_histogram: Counter = field(default_factory=Counter)  # n turns -> conversations

    def as_dict(self) -> dict[str, Any]:
        return {"records_read": self.records_read, "conversations": self.conversations,
                "dropped": dict(self.dropped), "turns_histogram": dict(sorted(self.turns_histogram.items()))}


# ------------------------------------------------------------------------------------------- formats
def _need(rec: Any, *keys: str) -> None:
    if not isinstance(rec, dict):
        raise RecordError(f"expected a JSON object with {', '.join(repr(k) for k in keys)}, "
                          f"got {type(rec).__name__}")
    missing = [k for k in keys if k not in rec]
    if missing:
        found = ", ".join(repr(k) for k in rec) or "none"
        raise RecordError(f"missing column {', '.join(repr(k) for k in missing)} (columns found: {found})")


def _nonempty_list(value: Any, key: str, shape: str) -> list:
    """The record's list of turns / messages, or a RecordError saying what it should look like."""
    if not isinstance(value, list) or not value:
        raise RecordError(f"{key!r} must be a non-empty list of {shape}")
    return value


def _text(rec: dict, key: str, *, allow_empty: bool = False) -> str:
    value = rec.get(key, "")
    if value is None:
        value = ""
    if not isinstance(value, str):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        else:
            raise RecordError(f"{key!r} must be text, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RecordError(f"empty or whitespace-only {key!r}")
    return value


def _as_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    if isinstance(value, int):
        return bool(value)
    raise RecordError(f"{key!r} must be true or false, got {value!r}")


def conversation_map_fn(rec: Any) -> list[Turn]:
    """XTuner's own format: `{"conversation": [{"system"?, "input", "output", "output_with_loss"?}, ...]}`."""
    _need(rec, "conversation")
    conv = _nonempty_list(rec["conversation"], "conversation", "{input, output} turns")
    turns = []
    for i, t in enumerate(conv):
        if not isinstance(t, dict):
            raise RecordError(f"turn {i + 1} must be an object with input and output")
        if "output" not in t:
            raise RecordError(f"turn {i + 1}: missing 'output' (keys found: {', '.join(map(repr, t)) or 'none'})")
        try:
            output = _text(t, "output")
            inp = _text(t, "input", allow_empty=True)
            system = _text(t, "system", allow_empty=True)
        except RecordError as exc:
            raise RecordError(f"turn {i + 1}: {exc}") from None
        loss = _as_bool(t.get("output_with_loss", True), "output_with_loss")
        turns.append(Turn(inp, output, system, loss))
    return turns


_OASST_MARK = re.compile(r"###\s*(Human|Assistant)\s*:")


def oasst1_map_fn(rec: Any) -> list[Turn]:
    """openassistant-guanaco text: `### Human: ... ### Assistant: ...`. Only the role markers split it (a `###`
    heading inside a reply stays in the reply); a trailing unanswered Human turn is dropped."""
    _need(rec, "text")
    text = _text(rec, "text")
    marks = list(_OASST_MARK.finditer(text))
    if not marks:
        raise RecordError("no '### Human:' / '### Assistant:' markers in 'text'")
    pieces = []
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        pieces.append((m.group(1), text[m.end():end].strip()))
    turns: list[Turn] = []
    pending: list[str] = []
    for role, content in pieces:
        if role == "Human":
            pending.append(content)
        elif pending:
            if not content:
                raise RecordError(f"empty Assistant reply in turn {len(turns) + 1}")
            turns.append(Turn("\n".join(pending), content))
            pending = []
    if not turns:
        raise RecordError("no Human message answered by an Assistant message")
    return turns


def alpaca_map_fn(rec: Any, suffix: str = "", system: str = "") -> list[Turn]:
    ins, inp, out = f"instruction{suffix}", f"input{suffix}", f"output{suffix}"
    _need(rec, ins, out)
    instruction = _text(rec, ins)
    output = _text(rec, out)
    if output.strip() == "<nooutput>":
        raise SkipRecord("alpaca <nooutput>")
    extra = _text(rec, inp, allow_empty=True) if inp in rec else ""
    prompt = f"{instruction}\n{extra}" if extra.strip() else instruction
    return [Turn(prompt, output, system)]


def alpaca_zh_map_fn(rec: Any) -> list[Turn]:
    return alpaca_map_fn(rec, "_zh")


def medical_map_fn(rec: Any) -> list[Turn]:
    return alpaca_map_fn(rec, "", SYSTEM_TEMPLATES["medical"])


def code_alpaca_map_fn(rec: Any) -> list[Turn]:
    _need(rec, "prompt", "completion")
    return [Turn(_text(rec, "prompt"), _text(rec, "completion"), SYSTEM_TEMPLATES["coder"])]


def default_map_fn(rec: Any) -> list[Turn]:
    _need(rec, "input", "output")
    return [Turn(_text(rec, "input"), _text(rec, "output"))]


def pretrain_map_fn(rec: Any) -> list[Turn]:
    _need(rec, "text")
    return [Turn("", _text(rec, "text").strip())]


def _content(msg: dict, i: int) -> str:
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


def _messages_to_turns(messages: list[tuple[str, str, bool]]) -> list[Turn]:
    """(role, content, loss) with roles system / user / assistant / tool -> turns (XTuner's openai_map_fn:
    leading assistant messages skipped, system attached to the next turn, consecutive user / tool contents
    joined, each assistant message closes a turn; a trailing unanswered user message is dropped)."""
    turns: list[Turn] = []
    system, inputs = "", []
    seen_user = False
    for role, content, loss in messages:
        if role == "system":
            system += content
        elif role in ("user", "tool"):
            inputs.append(content)
            seen_user = True
        elif role == "assistant":
            if not seen_user:
                continue
            if not content.strip():
                raise RecordError(f"empty assistant message in turn {len(turns) + 1}")
            turns.append(Turn("\n".join(inputs), content, system, loss))
            system, inputs = "", []
    if not turns:
        raise RecordError("no user message answered by an assistant message")
    return turns


_ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
                 "bot": "assistant", "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool",
                 "function_call": "assistant"}


def openai_map_fn(rec: Any) -> list[Turn]:
    """`{"messages": [{"role", "content", "loss"?}]}` or a bare list of messages; roles system, user,
    assistant, tool (a tool result is prompt text of the next turn, never trained on)."""
    if isinstance(rec, dict):
        _need(rec, "messages")
    msgs = _nonempty_list(rec["messages"] if isinstance(rec, dict) else rec, "messages", "{role, content}")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m:
            raise RecordError(f"message {i + 1} must be an object with 'role' and 'content'")
        role = _ROLE_ALIASES.get(str(m["role"]).lower())
        if role is None:
            raise RecordError(f"message {i + 1}: unknown role {m['role']!r} (use system, user, assistant or tool)")
        out.append((role, _content(m, i), _as_bool(m.get("loss", True), "loss")))
    return _messages_to_turns(out)


def sharegpt_map_fn(rec: Any) -> list[Turn]:
    """`{"conversations": [{"from": human|gpt|system|function_call|observation, "value"}], "system"?, "tools"?}`."""
    _need(rec, "conversations")
    conv = _nonempty_list(rec["conversations"], "conversations", "{from, value}")
    out = []
    system = rec.get("system") or ""
    if rec.get("tools"):
        tools = rec["tools"] if isinstance(rec["tools"], str) else json.dumps(rec["tools"], ensure_ascii=False)
        system = (system + "\n" if system else "") + f"Tools: {tools}"
    if system:
        out.append(("system", system, True))
    for i, m in enumerate(conv):
        if not isinstance(m, dict) or "from" not in m or "value" not in m:
            raise RecordError(f"message {i + 1} must be an object with 'from' and 'value'")
        role = _ROLE_ALIASES.get(str(m["from"]).lower())
        if role is None:
            raise RecordError(f"message {i + 1}: unknown 'from' {m['from']!r}")
        value = m["value"] if isinstance(m["value"], str) else json.dumps(m["value"], ensure_ascii=False)
        out.append((role, value, True))
    # consecutive assistant messages (function_call then gpt after an observation) are separate turns
    return _messages_to_turns(out)


# -------- msagent_react (MSAgent-Bench): XTuner's ReAct conversion, with safe parsing (no eval)
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
    _need(rec, "conversations")
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


@dataclass(frozen=True)
class DatasetFormat:
    name: str
    map_fn: Callable[[Any], list[Turn]]
    description: str
    kind: str = "chat"  # "text": plain-text (pre-)training, no chat template


_FORMATS = [
    DatasetFormat("conversation", conversation_map_fn,
                  'XTuner JSON/JSONL: {"conversation": [{"system"?, "input", "output"}, ...]}'),
    DatasetFormat("oasst1", oasst1_map_fn, 'openassistant-guanaco: {"text": "### Human: ... ### Assistant: ..."}'),
    DatasetFormat("alpaca", alpaca_map_fn, "{instruction, input, output} (input appended to the instruction)"),
    DatasetFormat("alpaca_zh", alpaca_zh_map_fn, "{instruction_zh, input_zh, output_zh}"),
    DatasetFormat("code_alpaca", code_alpaca_map_fn, "{prompt, completion}, system prompt 'coder'"),
    DatasetFormat("medical", medical_map_fn, "{instruction, input, output}, system prompt 'medical'"),
    DatasetFormat("default", default_map_fn, "{input, output}"),
    DatasetFormat("openai", openai_map_fn,
                  '{"messages": [{role, content, loss?}]} or a bare list; roles system/user/assistant/tool'),
    DatasetFormat("sharegpt", sharegpt_map_fn,
                  '{"conversations": [{from: human|gpt|system|function_call|observation, value}], tools?}'),
    DatasetFormat("msagent_react", msagent_react_map_fn,
                  "MSAgent-Bench {conversations}: <|startofthink|> form and ReAct (iic/ms_agent) form"),
    DatasetFormat("pretrain", pretrain_map_fn, '{"text": ...} or .txt lines: plain text, loss on every token',
                  kind="text"),
]
FORMATS: dict[str, DatasetFormat] = {f.name: f for f in _FORMATS}
FORMATS["wizardlm"] = DatasetFormat("wizardlm", sharegpt_map_fn, "alias of sharegpt (XTuner's wizardlm_map_fn)")


def format_names() -> list[str]:
    return list(FORMATS)


def get_format(name: str) -> DatasetFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise unknown_name_error("dataset format", name, FORMATS, "list-dataset-format") from None


def _map_records(path: str | os.PathLike, f: DatasetFormat, stats: ReadStats,
                 on_error: Callable[[RawRecord, RecordError], None], *, max_records: int | None = None,
                 **raw_options: Any) -> list[Record]:
    """Every raw record of `path` through the format's map function, counted in `stats`. Records the format
    skips on purpose count as dropped; a record it rejects goes to `on_error` (raise, or collect and go on)."""
    records: list[Record] = []
    for raw in iter_raw(path, **raw_options):
        if max_records is not None and stats.records_read >= max_records:
            break
        stats.records_read += 1
        try:
            turns = f.map_fn(raw.data)
        except SkipRecord as exc:
            stats.dropped[str(exc)] += 1
            continue
        except RecordError as exc:
            on_error(raw, exc)
            continue
        stats.conversations += 1
        stats.turns_histogram[len(turns)] += 1
        records.append(Record(tuple(turns), raw.where, raw.line))
    return records


def read_records(path: str | os.PathLike, fmt: str | DatasetFormat, *, name: str | None = None,
                 split: str | None = "train", max_records: int | None = None,
                 sheet: str | int | None = None) -> tuple[list[Record], ReadStats]:
    """All conversations of a dataset. The first bad record raises TunesmithError naming file and line;
    records a format drops on purpose are counted in `stats.dropped`."""
    f = get_format(fmt) if isinstance(fmt, str) else fmt
    stats = ReadStats()

    def stop(raw: RawRecord, exc: RecordError) -> None:
        raise TunesmithError(f"{raw.where}: {exc}", f"fix the record or check data.format (now {f.name!r}; "
                             "see `tunesmith list-dataset-format`)") from None

    records = _map_records(path, f, stats, stop, name=name, split=split, sheet=sheet, max_records=max_records)
    if stats.records_read == 0:
        raise TunesmithError(f"{path} has no records", "check data.path and data.split")
    return records, stats


@dataclass
class Problem:
    where: str
    message: str


def check_records(path: str | os.PathLike, fmt: str | DatasetFormat, *, name: str | None = None,
                  split: str | None = "train", max_problems: int = 1000) -> tuple[list[Record], ReadStats,
                                                                                   list[Problem]]:
    """Like read_records but collects every bad record instead of stopping at the first (file-level errors,
    such as malformed JSON, still raise)."""
    f = get_format(fmt) if isinstance(fmt, str) else fmt
    stats = ReadStats()
    problems: list[Problem] = []

    def collect(raw: RawRecord, exc: RecordError) -> None:
        stats.dropped["invalid record"] += 1
        if len(problems) < max_problems:
            problems.append(Problem(raw.where, str(exc)))

    records = _map_records(path, f, stats, collect, name=name, split=split)
    return records, stats, problems
