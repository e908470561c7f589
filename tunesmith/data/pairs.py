"""Preference pairs: the shapes they come in, read into one conversation, and encoded as two scored sequences.

A pair is a conversation whose last turn carries the chosen answer as ``output`` and the rejected one as
``rejected`` (`Turn.rejected`). The reader (format ``preference``, aliases ``ultrafeedback`` and ``hh_rlhf``)
takes any of these records:

=================================  ==================================================================================
shape                              record
=================================  ==================================================================================
TRL, explicit prompt               ``{"prompt": text | messages, "chosen": text | messages, "rejected": ...}``
TRL, implicit prompt               ``{"chosen": messages, "rejected": messages}``: the shared leading messages are
                                   the prompt (UltraFeedback-binarized, whose ``prompt`` text is then ignored)
HH-RLHF text                       ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}``
a conversation with a pair         ``{"messages": [..., {"role": "assistant", "chosen": ..., "rejected": ...}]}``, or
                                   XTuner's ``{"conversation": [..., {"input", "chosen", "rejected"}]}``
=================================  ==================================================================================

Encoding (`encode_pairs`): the chosen and the rejected conversation are rendered with the template exactly as SFT
renders them, and only the last answer (with its end-of-turn text) is scored: earlier answers are prompt. The two
sequences of a pair are consecutive samples (chosen at an even index, rejected at the odd one after it), so the
cache, packing and the batch keep them together. ``max_length`` counts each sequence; a longer one keeps its prompt
and the start of its answer (counted as ``answer_cut``); a pair whose prompt leaves no answer token is dropped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

from tunesmith.data.conversation import RecordError, SkipRecord, Turn
from tunesmith.data.encode import (
    Encoded,
    EncodeStats,
    _encode_slow,
    _labels_from_offsets,
    _tokenize,
    check_turns_can_end,
)
from tunesmith.data.fields import need, nonempty_list, text_field
from tunesmith.data.messages import messages_to_turns, normalize_role, read_messages
from tunesmith.data.render import render_conversation, tokenizer_info
from tunesmith.data.templates import Template, get_template

PAIRS = "pairs"  # DatasetFormat.kind of the pair formats


# ----------------------------------------------------------------------------------------- reading
def _messages(value: list, key: str) -> list[tuple[str, str, bool]]:
    return [(role, content, True) for role, content, _ in read_messages(value, name=f"{key!r} ")]


def _answer(rec: dict, key: str) -> str | list[tuple[str, str, bool]]:
    value = rec.get(key)
    if isinstance(value, list):
        return _messages(nonempty_list(value, key, "{role, content}"), key)
    return text_field(rec, key)


_HH_MARK = re.compile(r"\n\n(Human|Assistant): ")


def _hh_messages(text: str) -> list[tuple[str, str, bool]] | None:
    """An Anthropic HH-RLHF transcript as messages; None when the text has no such markers."""
    parts = _HH_MARK.split(text if text.startswith("\n\n") else "\n\n" + text)
    if len(parts) < 3:
        return None
    out = []
    for speaker, content in zip(parts[1::2], parts[2::2], strict=True):
        out.append(("user" if speaker == "Human" else "assistant", content.strip(), True))
    return out


def _final_answer(msgs: list[tuple[str, str, bool]], key: str) -> tuple[list[tuple[str, str, bool]], str]:
    """(the messages before the last assistant message, that message's text)."""
    if not msgs or msgs[-1][0] != "assistant":
        raise RecordError(f"{key!r} must end with an assistant message")
    if not msgs[-1][1].strip():
        raise RecordError(f"empty {key!r} answer")
    return msgs[:-1], msgs[-1][1]


def _pair(prompt: list[tuple[str, str, bool]], chosen: str, rejected: str) -> list[Turn]:
    if chosen == rejected:
        raise SkipRecord("chosen and rejected are the same")
    turns = messages_to_turns(prompt, to_answer=True)
    earlier = [replace(t, output_with_loss=False) for t in turns[:-1]]  # only the last answer is scored
    return [*earlier, replace(turns[-1], output=chosen, rejected=rejected)]


def _from_conversation(rec: dict) -> list[Turn]:
    turns = nonempty_list(rec["conversation"], "conversation", "{input, output} turns, the last with chosen/rejected")
    msgs: list[tuple[str, str, bool]] = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise RecordError(f"turn {i + 1} must be an object")
        if t.get("system"):
            msgs.append(("system", text_field(t, "system"), True))
        msgs.append(("user", text_field(t, "input", allow_empty=True), True))
        if i < len(turns) - 1:
            msgs.append(("assistant", text_field(t, "output"), True))
    last = turns[-1]
    if "chosen" not in last or "rejected" not in last:
        raise RecordError("the last turn needs 'chosen' and 'rejected'")
    return _pair(msgs, text_field(last, "chosen"), text_field(last, "rejected"))


def _from_messages(rec: dict) -> list[Turn] | None:
    """A message list whose last assistant message has chosen/rejected, or messages as the prompt of text
    answers beside them; None for other records with messages (UltraFeedback's are the chosen conversation)."""
    raw = nonempty_list(rec["messages"], "messages", "{role, content}")
    last = raw[-1]
    if isinstance(last, dict) and normalize_role(last.get("role")) == "assistant" and "chosen" in last:
        need(last, "chosen", "rejected")
        return _pair(_messages(raw[:-1], "messages"), text_field(last, "chosen"), text_field(last, "rejected"))
    if isinstance(rec.get("chosen"), str) and isinstance(rec.get("rejected"), str) and "prompt" not in rec:
        return _pair(_messages(raw, "messages"), text_field(rec, "chosen"), text_field(rec, "rejected"))
    return None


def preference_map_fn(rec: Any) -> list[Turn]:
    """One preference record of any shape of the module docstring -> the pair as a conversation."""
    if isinstance(rec, dict) and "conversation" in rec:
        return _from_conversation(rec)
    if isinstance(rec, dict) and isinstance(rec.get("messages"), list):
        turns = _from_messages(rec)
        if turns is not None:
            return turns
    need(rec, "chosen", "rejected")
    chosen, rejected = _answer(rec, "chosen"), _answer(rec, "rejected")
    prompt = rec.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str) and prompt is None:
        hh_c, hh_r = _hh_messages(chosen), _hh_messages(rejected)
        if hh_c is None or hh_r is None:
            raise RecordError("text 'chosen' / 'rejected' without a 'prompt' must be HH-RLHF transcripts "
                              "('\\n\\nHuman: ...\\n\\nAssistant: ...'); or add a 'prompt' column")
        chosen, rejected = hh_c, hh_r
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise RecordError("'chosen' and 'rejected' must both be text or both be message lists")
    if isinstance(chosen, list) and isinstance(rejected, list):
        head_c, answer_c = _final_answer(chosen, "chosen")
        head_r, answer_r = _final_answer(rejected, "rejected")
        if head_c != head_r:
            raise RecordError("'chosen' and 'rejected' must share the same messages before their last answer")
        if prompt is not None and not any(role == "user" for role, _, _ in head_c):
            head_c = _prompt_messages(prompt) + head_c  # TRL explicit prompt with answer messages
        return _pair(head_c, answer_c, answer_r)
    if prompt is None:
        raise RecordError("missing column 'prompt' (needed when 'chosen' and 'rejected' are plain answers)")
    return _pair(_prompt_messages(prompt), chosen, rejected)


def _prompt_messages(prompt: Any) -> list[tuple[str, str, bool]]:
    if isinstance(prompt, list):
        return _messages(nonempty_list(prompt, "prompt", "{role, content}"), "prompt")
    return [("user", text_field({"prompt": prompt}, "prompt"), True)]


def rejected_conversation(turns: Sequence[Turn]) -> list[Turn]:
    """The pair's conversation with the rejected answer in place of the chosen one."""
    last = turns[-1]
    return [*turns[:-1], replace(last, output=last.rejected or "", rejected=None)]


# ----------------------------------------------------------------------------------------- encoding
def encode_pairs(pairs: Iterable[Sequence[Turn]], tokenizer: Any, template: Template | str, *, max_length: int,
                 system: str = "", batch_size: int = 128, progress: Callable[[int], None] | None = None
                 ) -> tuple[list[Encoded], EncodeStats]:
    """Encode pairs as consecutive (chosen, rejected) samples; see the module docstring. ``stats.samples`` counts
    sequences (two per pair)."""
    t = get_template(template) if isinstance(template, str) else template
    info = tokenizer_info(tokenizer)
    check_turns_can_end(t, info)
    stats = EncodeStats()
    out: list[Encoded] = []
    batch: list[Sequence[Turn]] = []
    done = 0

    def flush() -> None:
        nonlocal done
        rendered = []
        for turns in batch:
            rendered.append(render_conversation([*turns[:-1], replace(turns[-1], rejected=None)], tokenizer, t,
                                                system=system))
            rendered.append(render_conversation(rejected_conversation(turns), tokenizer, t, system=system))
        if info.fast:
            encoded = [_labels_from_offsets(ids, offsets, r.spans) for r, (ids, offsets) in
                       zip(rendered, _tokenize(tokenizer, [r.text for r in rendered], info), strict=True)]
        else:  # no offsets: boundaries found by tokenizing the text before each
            encoded = [_encode_slow(r, tokenizer)[:2] for r in rendered]
        for k in range(0, len(encoded), 2):
            pair = []
            for ids_arr, labels in encoded[k:k + 2]:
                stats.lengths.append(len(ids_arr))
                if len(ids_arr) > max_length:
                    stats.truncated["answer_cut"] += 1
                    ids_arr, labels = ids_arr[:max_length], labels[:max_length]
                pair.append(Encoded(ids_arr, labels))
            if any(s.num_loss_tokens == 0 for s in pair):
                stats.dropped["no answer token left (prompt fills max_length)"] += 1
                continue
            out.extend(pair)
            stats.samples += 2
            stats.tokens += sum(len(s.input_ids) for s in pair)
            stats.loss_tokens += sum(s.num_loss_tokens for s in pair)
        done += len(batch)
        batch.clear()
        if progress is not None:
            progress(done)

    for turns in pairs:
        if turns[-1].rejected is None:
            raise ValueError("encode_pairs needs pairs (the last turn's rejected answer is missing)")
        batch.append(turns)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    return out, stats

