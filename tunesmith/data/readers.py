"""Readers: one function per dataset format, from a raw record to a conversation, and their registry.

Raw records (with file and line) come from `tunesmith.data.sources` (files, folders, hub datasets).

Formats (XTuner's `dataset_map_fn` names): `FORMATS[name] = DatasetFormat(name, map_fn, description, kind)`;
`map_fn(record) -> list[Turn]` raises `RecordError` (bad record: the caller names file and line) or
`SkipRecord` (dropped on purpose, e.g. alpaca `<nooutput>`, counted with its reason).
The MSAgent-Bench ReAct reader and its tool preamble live in `tunesmith.data.msagent`.

Public API: `format_names()`, `get_format(name)`, `read_records(path, fmt, ...) -> (list[Record], ReadStats)`
(skips and counts bad records; `strict=True` raises `TunesmithError` at the first, naming file and line),
`check_records(...)` (collects every problem with its message, for check-custom-dataset).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tunesmith.data.conversation import RecordError, SkipRecord, Turn
from tunesmith.data.fields import as_bool, need, nonempty_list, text_field
from tunesmith.data.messages import messages_to_turns, normalize_role, read_messages
from tunesmith.data.msagent import msagent_react_map_fn
from tunesmith.data.pairs import PAIRS, preference_map_fn
from tunesmith.data.sources import RawRecord, UnreadableLine, iter_raw  # noqa: F401  (RawRecord: re-exported)
from tunesmith.data.templates import SYSTEM_TEMPLATES
from tunesmith.data.xtuner_readers import XTUNER_FORMATS
from tunesmith.errors import TunesmithError, unknown_name_error


@dataclass(frozen=True)
class Record:
    turns: tuple[Turn, ...]
    where: str
    line: int


MALFORMED = "malformed: "  # prefix of the `dropped` reasons of records a format rejects (skipped, not strict)
FIRST_LOCATIONS = 3  # where the first malformed records of each reason are, for the summary


@dataclass
class ReadStats:
    records_read: int = 0
    conversations: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    turns_histogram: Counter = field(default_factory=Counter)  # n turns -> conversations
    malformed_at: dict[str, list[str]] = field(default_factory=dict)  # malformed reason -> first "file:line"s

    def skip_malformed(self, raw: RawRecord, exc: RecordError) -> None:
        # one reason per kind of problem: the numbers in a message (turn 3, message 5) differ record to record
        reason = MALFORMED + re.sub(r"\d+", "N", str(exc))
        self.dropped[reason] += 1
        first = self.malformed_at.setdefault(reason, [])
        if len(first) < FIRST_LOCATIONS:
            first.append(raw.where)

    @property
    def malformed(self) -> int:
        return sum(n for reason, n in self.dropped.items() if reason.startswith(MALFORMED))

    def as_dict(self) -> dict[str, Any]:
        return {"records_read": self.records_read, "conversations": self.conversations,
                "dropped": dict(self.dropped), "turns_histogram": dict(sorted(self.turns_histogram.items())),
                "malformed_at": self.malformed_at}


# ------------------------------------------------------------------------------------------- formats
def conversation_map_fn(rec: Any) -> list[Turn]:
    """XTuner's own format: `{"conversation": [{"system"?, "input", "output", "output_with_loss"?}, ...]}`."""
    need(rec, "conversation")
    conv = nonempty_list(rec["conversation"], "conversation", "{input, output} turns")
    turns = []
    for i, t in enumerate(conv):
        if not isinstance(t, dict):
            raise RecordError(f"turn {i + 1} must be an object with input and output")
        if "output" not in t:
            raise RecordError(f"turn {i + 1}: missing 'output' (keys found: {', '.join(map(repr, t)) or 'none'})")
        try:
            output = text_field(t, "output")
            inp = text_field(t, "input", allow_empty=True)
            system = text_field(t, "system", allow_empty=True)
        except RecordError as exc:
            raise RecordError(f"turn {i + 1}: {exc}") from None
        loss = as_bool(t.get("output_with_loss", True), "output_with_loss")
        turns.append(Turn(inp, output, system, loss))
    return turns


_OASST_MARK = re.compile(r"###\s*(Human|Assistant)\s*:")


def oasst1_map_fn(rec: Any) -> list[Turn]:
    """openassistant-guanaco text: `### Human: ... ### Assistant: ...`. As XTuner, a message ends at the next
    `###` of any kind (a `### Usage` heading inside a reply cuts the reply there); a trailing unanswered Human
    turn is dropped."""
    need(rec, "text")
    text = text_field(rec, "text")
    marks = list(_OASST_MARK.finditer(text))
    if not marks:
        raise RecordError("no '### Human:' / '### Assistant:' markers in 'text'")
    pieces = []
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        pieces.append((m.group(1), text[m.end():end].split("###", 1)[0].strip()))
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
    need(rec, ins, out)
    instruction = text_field(rec, ins)
    output = text_field(rec, out)
    if output.strip() == "<nooutput>":
        raise SkipRecord("alpaca <nooutput>")
    extra = text_field(rec, inp, allow_empty=True) if inp in rec else ""
    # XTuner joins them with "\n" even when the input is empty, so an instruction alone ends in "\n"
    return [Turn(f"{instruction}\n{extra}", output, system)]


def alpaca_zh_map_fn(rec: Any) -> list[Turn]:
    return alpaca_map_fn(rec, "_zh")


def medical_map_fn(rec: Any) -> list[Turn]:
    return alpaca_map_fn(rec, "", SYSTEM_TEMPLATES["medical"])


def code_alpaca_map_fn(rec: Any) -> list[Turn]:
    need(rec, "prompt", "completion")
    return [Turn(text_field(rec, "prompt"), text_field(rec, "completion"), SYSTEM_TEMPLATES["coder"])]


def default_map_fn(rec: Any) -> list[Turn]:
    need(rec, "input", "output")
    return [Turn(text_field(rec, "input"), text_field(rec, "output"))]


def pretrain_map_fn(rec: Any) -> list[Turn]:
    need(rec, "text")
    return [Turn("", text_field(rec, "text").strip())]


def openai_map_fn(rec: Any) -> list[Turn]:
    """`{"messages": [{"role", "content", "loss"?}]}` or a bare list of messages; roles system, user,
    assistant, tool (a tool result is prompt text of the next turn, never trained on)."""
    if isinstance(rec, dict):
        need(rec, "messages")
    msgs = nonempty_list(rec["messages"] if isinstance(rec, dict) else rec, "messages", "{role, content}")
    return messages_to_turns(read_messages(msgs))


def sharegpt_map_fn(rec: Any) -> list[Turn]:
    """`{"conversations": [{"from": human|gpt|system|function_call|observation, "value"}], "system"?, "tools"?}`."""
    need(rec, "conversations")
    conv = nonempty_list(rec["conversations"], "conversations", "{from, value}")
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
        role = normalize_role(m["from"])
        if role is None:
            raise RecordError(f"message {i + 1}: unknown 'from' {m['from']!r}")
        value = m["value"] if isinstance(m["value"], str) else json.dumps(m["value"], ensure_ascii=False)
        out.append((role, value, True))
    # consecutive assistant messages (function_call then gpt after an observation) are separate turns
    return messages_to_turns(out)


@dataclass(frozen=True)
class DatasetFormat:
    name: str
    map_fn: Callable[[Any], list[Turn]]
    description: str
    kind: str = "chat"  # "text": plain-text (pre-)training, no chat template; "pairs": preference pairs (DPO / ORPO)


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
_FORMATS += [DatasetFormat(name, map_fn, description) for name, map_fn, description in XTUNER_FORMATS]
FORMATS: dict[str, DatasetFormat] = {f.name: f for f in _FORMATS}
FORMATS["wizardlm"] = DatasetFormat("wizardlm", sharegpt_map_fn, "alias of sharegpt (XTuner's wizardlm_map_fn)")
FORMATS["preference"] = DatasetFormat(
    "preference", preference_map_fn, 'pairs for DPO / ORPO: {"prompt", "chosen", "rejected"} as text or messages '
    "(TRL), chosen/rejected conversations (UltraFeedback), HH-RLHF transcripts, or a conversation whose last "
    "turn has chosen/rejected", kind=PAIRS)
FORMATS["ultrafeedback"] = DatasetFormat("ultrafeedback", preference_map_fn, "alias of preference "
                                         "(UltraFeedback-binarized: chosen/rejected message lists)", kind=PAIRS)
FORMATS["hh_rlhf"] = DatasetFormat("hh_rlhf", preference_map_fn, "alias of preference (Anthropic HH-RLHF: "
                                   "chosen/rejected transcripts)", kind=PAIRS)


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
    for raw in iter_raw(path, keep_unreadable=True, **raw_options):
        if max_records is not None and stats.records_read >= max_records:
            break
        stats.records_read += 1
        try:
            if isinstance(raw.data, UnreadableLine):
                raise RecordError(raw.data.message)
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
                 sheet: str | int | None = None, strict: bool = False) -> tuple[list[Record], ReadStats]:
    """All conversations of a dataset. A record the format rejects is skipped and counted by reason, with the
    first locations (`stats.malformed_at`), as XTuner skips what it cannot map; `strict` raises TunesmithError
    at the first one instead, naming file and line. Records a format drops on purpose count in `stats.dropped`.
    No conversation at all is an error naming the first problem."""
    f = get_format(fmt) if isinstance(fmt, str) else fmt
    stats = ReadStats()
    hint = f"fix the record or check data.format (now {f.name!r}; see `tunesmith list-dataset-format`)"
    first: list[tuple[RawRecord, RecordError]] = []

    def stop(raw: RawRecord, exc: RecordError) -> None:
        raise TunesmithError(f"{raw.where}: {exc}", hint) from None

    def skip(raw: RawRecord, exc: RecordError) -> None:
        if not first:
            first.append((raw, exc))
        stats.skip_malformed(raw, exc)

    records = _map_records(path, f, stats, stop if strict else skip, name=name, split=split, sheet=sheet,
                           max_records=max_records)
    if stats.records_read == 0:
        raise TunesmithError(f"{path} has no records", "check data.path and data.split")
    if not records and first:
        raw, exc = first[0]
        raise TunesmithError(f"{path}: none of its {stats.records_read} records reads as format {f.name!r} "
                             f"(first: {raw.where}: {exc})", hint)
    return records, stats


@dataclass
class Problem:
    where: str
    message: str


def check_records(path: str | os.PathLike, fmt: str | DatasetFormat, *, name: str | None = None,
                  split: str | None = "train", max_problems: int = 1000) -> tuple[list[Record], ReadStats,
                                                                                   list[Problem]]:
    """Like read_records but collects every bad record instead of stopping at the first, malformed JSON lines
    included (a file that cannot be read at all, e.g. a broken JSON array, still raises)."""
    f = get_format(fmt) if isinstance(fmt, str) else fmt
    stats = ReadStats()
    problems: list[Problem] = []

    def collect(raw: RawRecord, exc: RecordError) -> None:
        stats.dropped["invalid record"] += 1
        if len(problems) < max_problems:
            problems.append(Problem(raw.where, str(exc)))

    records = _map_records(path, f, stats, collect, name=name, split=split)
    return records, stats, problems
