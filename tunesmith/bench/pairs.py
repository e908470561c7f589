"""The preference pairs of the end-to-end bench: a deterministic ``{"prompt", "chosen", "rejected"}`` JSONL file cut
from plain text (the bundled oasst1 sample), sized with the bench's own tokenizer and prompt template.

Every sequence of a pair (the prompt with the chosen answer, the prompt with the rejected one), rendered with the
template exactly as `tunesmith train` renders it (``tunesmith.data.render``), holds at most ``max_length - margin``
tokens, and as close to that as the text allows: the prompt takes about ``prompt_tokens`` of them (its rendered
form: template text included), each answer the rest (about 750 of 1,008 at the defaults). Neither `tunesmith
train` (``data.max_length`` per sequence) nor TRL (``max_length`` per sequence; it appends EOS, which the margin
covers) truncates anything. The text is one token stream of all records (``### Human:`` / ``### Assistant:``
markers dropped), cut into consecutive slices: prompt, chosen, rejected, next pair; it wraps around when it runs
out. Nothing is random, so two calls write the same file.

`pair_texts` is the other half: one pair as TRL's plain-text ``prompt`` / ``chosen`` / ``rejected`` strings, i.e.
the same rendered text split where the answer starts, so TRL and `tunesmith train` see the same tokens.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.files import write_text_atomic

TEMPLATE = "internlm_chat"  # the prompt template of the internlm_chat_7b recipes the bench runs
_MARKER = re.compile(r"\s*###\s*(Human|Assistant):\s*")


@dataclass
class PairsInfo:
    path: str
    pairs: int
    max_length: int
    budget: int  # the most tokens a rendered sequence may hold (max_length - margin)
    prompt_lengths: list[int] = field(default_factory=list)  # rendered prompt tokens, per pair
    sequence_lengths: list[int] = field(default_factory=list)  # rendered chosen, rejected, chosen, ... tokens

    def summary(self) -> str:
        seqs, prompts = self.sequence_lengths, self.prompt_lengths
        return (f"{self.pairs} pairs, sequences {min(seqs)}-{max(seqs)} tokens (median "
                f"{statistics.median(seqs):.0f}, at most {self.budget} of max_length {self.max_length}), prompts "
                f"{min(prompts)}-{max(prompts)}")


def source_text(path: str | Path) -> str:
    """The text of every record of an oasst1-style JSONL file (``{"text": ...}``), markers dropped, records
    separated by blank lines."""
    parts = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        text = json.loads(line).get("text", "")
        text = _MARKER.sub("\n\n", text).strip()
        if text:
            parts.append(text)
    if not parts:
        raise ValueError(f"{path}: no text records")
    return "\n\n".join(parts)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def rendered_length(tokenizer: Any, prompt: str, answer: str, template: str = TEMPLATE) -> int:
    """Tokens of one sequence of a pair as `tunesmith train` renders and tokenizes it."""
    from tunesmith.data.conversation import Turn
    from tunesmith.data.render import render_conversation

    return len(_ids(tokenizer, render_conversation([Turn(prompt, answer)], tokenizer, template).text))


def prompt_length(tokenizer: Any, prompt: str, template: str = TEMPLATE) -> int:
    from tunesmith.data.conversation import Turn
    from tunesmith.data.render import render_prompt_text

    return len(_ids(tokenizer, render_prompt_text(tokenizer, template, [Turn(prompt, "")])))


class _Stream:
    """Consecutive token slices of one long text, wrapping around."""

    def __init__(self, ids: list[int]):
        if not ids:
            raise ValueError("no tokens in the source text")
        self.ids, self.pos = ids, 0

    def take(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            chunk = self.ids[self.pos:self.pos + n - len(out)]
            out += chunk
            self.pos = (self.pos + len(chunk)) % len(self.ids)
        return out


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def _fit_prompt(tokenizer: Any, ids: list[int], target: int, template: str) -> tuple[str, int]:
    """The longest prefix of ``ids`` whose rendered prompt holds at most ``target`` tokens."""
    n = len(ids)
    for _ in range(12):
        text = _decode(tokenizer, ids[:n])
        have = prompt_length(tokenizer, text, template)
        if have <= target or n <= 1:
            return text, have
        n -= have - target
    raise RuntimeError("could not fit the prompt")  # pragma: no cover - the loop shrinks by the excess each time


def _fit_answer(tokenizer: Any, prompt: str, ids: list[int], budget: int, template: str) -> tuple[str, int]:
    """The longest prefix of ``ids`` (grown to about the budget, then shrunk) whose rendered sequence with
    ``prompt`` holds at most ``budget`` tokens."""
    n = len(ids)
    best: tuple[str, int] | None = None
    for _ in range(16):
        text = _decode(tokenizer, ids[:n])
        have = rendered_length(tokenizer, prompt, text, template)
        if have <= budget:
            if best is None or have > best[1]:
                best = (text, have)
            if budget - have <= 2 or n >= len(ids):
                break
            n = min(len(ids), n + (budget - have))  # decoding merged tokens: take a little more
        else:
            n -= max(1, have - budget)
        if n < 1:
            break
    if best is None:
        raise ValueError(f"a rendered prompt leaves no room for an answer within {budget} tokens")
    return best


def write_pairs(path: str | Path, tokenizer: Any, *, source: str | Path, pairs: int = 64, max_length: int = 1024,
                prompt_tokens: int = 256, margin: int = 16, template: str = TEMPLATE) -> PairsInfo:
    """Write ``pairs`` preference pairs to ``path`` (see the module docstring) and say what they hold."""
    budget = max_length - margin
    if pairs < 1 or prompt_tokens < 8 or budget - prompt_tokens < 16:
        raise ValueError(f"pairs of {max_length} tokens (margin {margin}) leave no room for a {prompt_tokens}-token "
                         "prompt and an answer")
    stream = _Stream(_ids(tokenizer, source_text(source)))
    answer_take = budget - prompt_tokens + 8  # a few spare tokens: decoding and re-encoding may merge some
    info = PairsInfo(str(path), pairs, max_length, budget)
    lines = []
    for _ in range(pairs):
        prompt, plen = _fit_prompt(tokenizer, stream.take(prompt_tokens), prompt_tokens, template)
        record = {"prompt": prompt}
        for key in ("chosen", "rejected"):
            text, have = _fit_answer(tokenizer, prompt, stream.take(answer_take), budget, template)
            record[key] = text
            info.sequence_lengths.append(have)
        if record["chosen"] == record["rejected"]:  # only a tiny source could repeat itself exactly
            record["rejected"] = record["rejected"][: len(record["rejected"]) // 2]
        info.prompt_lengths.append(plen)
        lines.append(json.dumps(record, ensure_ascii=False))
    write_text_atomic(path, "\n".join(lines) + "\n")
    return info


def read_pairs(path: str | Path) -> list[dict[str, str]]:
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            out.append({"prompt": rec["prompt"], "chosen": rec["chosen"], "rejected": rec["rejected"]})
    return out


def pair_texts(tokenizer: Any, pair: dict[str, str], template: str = TEMPLATE) -> dict[str, str]:
    """One pair as TRL's plain-text columns: ``prompt`` = the rendered prompt (the template's BOS text left out
    when the tokenizer adds BOS itself, as TRL tokenizes with special tokens), ``chosen`` / ``rejected`` = the rest
    of each rendered sequence (answer, end-of-turn text, separator)."""
    from tunesmith.data.conversation import Turn
    from tunesmith.data.render import render_conversation, render_prompt_text, tokenizer_info

    prompt = render_prompt_text(tokenizer, template, [Turn(pair["prompt"], "")])
    out = {"prompt": prompt}
    for key in ("chosen", "rejected"):
        full = render_conversation([Turn(pair["prompt"], pair[key])], tokenizer, template).text
        if not full.startswith(prompt):
            raise ValueError(f"template {template!r} renders the prompt differently alone and with an answer")
        out[key] = full[len(prompt):]
    bos = tokenizer_info(tokenizer).bos_text
    if bos and out["prompt"].startswith(bos):
        out["prompt"] = out["prompt"][len(bos):]
    return out
