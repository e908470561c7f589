"""Encoding: a conversation + tokenizer + template -> `input_ids` and `labels` (same length, -100 = no loss,
NOT shifted: the loss shifts).

The whole conversation is rendered to text first and tokenized in one piece (exactly as generation prompts
are tokenized at chat time, and as `tokenizer.apply_chat_template` does); labels come from character
offsets: a token has loss when it starts inside a reply or its end-of-turn text (SUFFIX, or the EOS token
when the template has no SUFFIX_AS_EOS). So the end-of-turn token is learned even when pad == eos.

The text and its loss spans come from `tunesmith.data.render` (BOS, EOS, SEP, `auto` and default system prompts
are decided there).

Over-long samples are cut at a turn boundary when at least one whole turn fits, otherwise cut at max_length;
both are counted (`EncodeStats.truncated`). Plain-text (`pretrain`) documents longer than max_length are split
into several samples, nothing dropped. A sample left with no loss token is dropped and counted.

Public API:
- `encode_conversation(turns, tokenizer, template, *, max_length=None, ...) -> Encoded | None`
- `encode_records(convs, tokenizer, template, *, max_length, kind="chat", system="", ...)
   -> (list[Encoded], EncodeStats)` (batched tokenization; the training path)
- `encode_prompt(...) -> list[int]`: the generation prompt for the last turn (chat, eval, serve), as ids.
Stop words (`stop_words_for`, `cut_at_stop`) live in `tunesmith.data.stopwords`.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tunesmith.data.conversation import Turn
from tunesmith.data.render import (
    Rendered,
    TokenizerInfo,
    render_conversation,
    render_prompt_text,
    render_text,
    tokenizer_info,
)
from tunesmith.data.templates import Template, get_template
from tunesmith.errors import TunesmithError

IGNORE_INDEX = -100
ENCODE_VERSION = 3  # bump when the encoding of the same inputs changes (invalidates caches)


@dataclass(frozen=True)
class Encoded:
    input_ids: np.ndarray  # int32 [n]
    labels: np.ndarray  # int32 [n]

    @property
    def num_loss_tokens(self) -> int:
        return int((self.labels[1:] != IGNORE_INDEX).sum())


@dataclass
class EncodeStats:
    samples: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    truncated: Counter = field(default_factory=Counter)  # "at_turn_boundary" / "inside_turn" / "split_document"
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    lengths: list[int] = field(default_factory=list)  # token length of each conversation before truncation

    def as_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "tokens": self.tokens, "loss_tokens": self.loss_tokens,
                "truncated": dict(self.truncated), "dropped": dict(self.dropped)}


# ----------------------------------------------------------------------------------------- tokenizing
def _labels_from_offsets(ids: Sequence[int], offsets: Sequence[tuple[int, int]], spans) -> tuple[np.ndarray,
                                                                                                 np.ndarray]:
    ids_arr = np.asarray(ids, dtype=np.int32)
    labels = np.full(len(ids_arr), IGNORE_INDEX, dtype=np.int32)
    if len(ids_arr) and spans:
        starts = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)[:, 0]
        mask = np.zeros(len(ids_arr), dtype=bool)
        for s, e in spans:
            mask |= (starts >= s) & (starts < e)
        labels[mask] = ids_arr[mask]
    return ids_arr, labels


def _token_index(offsets: np.ndarray, char: int) -> int:
    return int(np.searchsorted(offsets[:, 0], char, side="left"))


def _tokenize(tokenizer: Any, texts: list[str], info: TokenizerInfo) -> list[tuple[list[int], np.ndarray | None]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if info.fast and backend is not None and not getattr(tokenizer, "split_special_tokens", False):
        # straight to the Rust tokenizer: the same ids and offsets without the per-text Python conversion
        encs = backend.encode_batch(texts, add_special_tokens=False)
        return [(e.ids, np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2)) for e in encs]
    if info.fast:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return [(ids, np.asarray(off, dtype=np.int64).reshape(-1, 2)) for ids, off in
                zip(enc["input_ids"], enc["offset_mapping"], strict=True)]
    return [(tokenizer(t, add_special_tokens=False)["input_ids"], None) for t in texts]


def common_prefix_length(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading ids two id arrays share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


def _encode_slow(rendered: Rendered, tokenizer: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """No offsets (a tokenizer on transformers' Python backend): the whole text is tokenized once, so the ids are
    the ones the model gets at inference (a piece-by-piece tokenization would not be: sentencepiece adds its dummy
    prefix to every piece). Each span and turn boundary is then placed by tokenizing the text before it: the tokens
    it shares with the whole text lie before the boundary, and so does a token that straddles it (it starts there,
    which is the offsets path's rule too). Every token of a piece gets the piece's start as its character offset.
    The price is one tokenization of a prefix per boundary: about 100k tokens/s for ten-turn conversations with a
    character-level Python tokenizer, against one pass for the offsets path."""
    text = rendered.text
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = np.asarray(whole, dtype=np.int32)
    cuts = sorted({0, len(text), *rendered.turn_starts, *(c for s in rendered.spans for c in s)})
    bounds = [0]
    for c in cuts[1:]:
        if c >= len(text):
            n = len(ids)
        else:
            head = np.asarray(tokenizer(text[:c], add_special_tokens=False)["input_ids"], dtype=np.int32)
            n = common_prefix_length(head, ids)
            if n < min(len(head), len(ids)):
                n += 1  # the first token that differs straddles c and starts before it: it goes there
        bounds.append(max(n, bounds[-1]))
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
    char_starts = np.zeros(len(ids), dtype=np.int64)
    for (a, _), (i, j) in zip(itertools.pairwise(cuts), itertools.pairwise(bounds), strict=True):
        if any(s <= a < e for s, e in rendered.spans):
            labels[i:j] = ids[i:j]
        char_starts[i:j] = a
    return ids, labels, np.stack([char_starts, char_starts], axis=1)


def _finish(ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray, rendered: Rendered, max_length: int | None,
            kind: str, stats: EncodeStats) -> list[Encoded]:
    stats.lengths.append(len(ids))
    if max_length is None or len(ids) <= max_length:
        pieces = [(ids, labels)]
    elif kind == "text":
        stats.truncated["split_document"] += 1
        pieces = [(ids[i:i + max_length], labels[i:i + max_length]) for i in range(0, len(ids), max_length)]
    else:
        keep = 0
        for k in range(1, len(rendered.turn_starts)):
            if _token_index(offsets, rendered.turn_starts[k]) <= max_length:
                keep = _token_index(offsets, rendered.turn_starts[k])
        if keep > 0:
            stats.truncated["at_turn_boundary"] += 1
        else:
            keep = max_length
            stats.truncated["inside_turn"] += 1
        pieces = [(ids[:keep], labels[:keep])]
    out = []
    for pid, plab in pieces:
        sample = Encoded(pid, plab)
        if sample.num_loss_tokens == 0:
            stats.dropped["no loss tokens (prompt fills max_length)" if kind != "text" else "too short"] += 1
            continue
        stats.samples += 1
        stats.tokens += len(pid)
        stats.loss_tokens += sample.num_loss_tokens
        out.append(sample)
    return out


def check_turns_can_end(template: Template, info: TokenizerInfo, *, text: bool = False) -> None:
    """A reply (or document) must end in something learnable: the template's SUFFIX or the tokenizer's EOS."""
    if (text or not template.suffix_as_eos or template.is_auto) and not info.eos_text and not template.is_auto:
        raise TunesmithError("the tokenizer has no eos_token, so replies cannot end",
                             "use a tokenizer with an eos_token, or a template whose SUFFIX ends a turn")


def encode_records(convs: Iterable[Sequence[Turn]], tokenizer: Any, template: Template | str, *,
                   max_length: int | None, kind: str = "chat", system: str = "", bot_name: str = "BOT",
                   batch_size: int = 256, progress: Callable[[int], None] | None = None
                   ) -> tuple[list[Encoded], EncodeStats]:
    """Encode many conversations (tokenized in batches). kind="text" ignores the template (plain text).
    `progress(n)` is called after each batch with the number of conversations done so far."""
    t = get_template(template) if isinstance(template, str) else template
    info = tokenizer_info(tokenizer)
    check_turns_can_end(t, info, text=kind == "text")
    stats = EncodeStats()
    out: list[Encoded] = []
    batch: list[Rendered] = []
    done = 0

    def flush() -> None:
        nonlocal done
        if not batch:
            return
        done += len(batch)
        if info.fast:
            for r, (ids, offsets) in zip(batch, _tokenize(tokenizer, [r.text for r in batch], info), strict=True):
                ids_arr, labels = _labels_from_offsets(ids, offsets, r.spans)
                out.extend(_finish(ids_arr, labels, offsets, r, max_length, kind, stats))
        else:
            for r in batch:
                ids_arr, labels, offsets = _encode_slow(r, tokenizer)
                out.extend(_finish(ids_arr, labels, offsets, r, max_length, kind, stats))
        batch.clear()
        if progress is not None:
            progress(done)

    for turns in convs:
        if kind == "text":
            batch.append(render_text(turns, info))
        else:
            batch.append(render_conversation(turns, tokenizer, t, system=system, bot_name=bot_name))
        if len(batch) >= batch_size:
            flush()
    flush()
    return out, stats


def encode_conversation(turns: Sequence[Turn], tokenizer: Any, template: Template | str, *,
                        max_length: int | None = None, kind: str = "chat", system: str = "",
                        bot_name: str = "BOT") -> Encoded | None:
    """One conversation (None when it has no loss token left)."""
    samples, _ = encode_records([turns], tokenizer, template, max_length=max_length, kind=kind, system=system,
                                bot_name=bot_name)
    return samples[0] if samples else None


def encode_prompt(tokenizer: Any, template: Template | str, turns: Sequence[Turn], *, system: str | None = None,
                  bot_name: str = "BOT") -> list[int]:
    text = render_prompt_text(tokenizer, template, turns, system=system, bot_name=bot_name)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
