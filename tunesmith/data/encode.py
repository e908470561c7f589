"""Encoding: a conversation + tokenizer + template -> `input_ids` and `labels` (same length, -100 = no loss,
NOT shifted: the loss shifts).

The whole conversation is rendered to text first and tokenized in one piece (exactly as generation prompts
are tokenized at chat time, and as `tokenizer.apply_chat_template` does); labels come from character
offsets: a token has loss when it starts inside a reply or its end-of-turn text (SUFFIX, or the EOS token
when the template has no SUFFIX_AS_EOS). So the end-of-turn token is learned even when pad == eos.

BOS follows the tokenizer: it is inserted only if the tokenizer itself starts sequences with one
(Llama / InternLM yes, Qwen / SmolLM2 no); in multi-turn samples a turn starts with BOS only when the previous
turn ended with EOS (XTuner 0.1.23). SEP is never trained on. `auto` uses the tokenizer's own Jinja
chat template (including any default system prompt it injects).

Over-long samples are cut at a turn boundary when at least one whole turn fits, otherwise cut at max_length;
both are counted (`EncodeStats.truncated`). Plain-text (`pretrain`) documents longer than max_length are split
into several samples, nothing dropped. A sample left with no loss token is dropped and counted.

Public API:
- `tokenizer_info(tokenizer) -> TokenizerInfo` (bos / eos text actually used)
- `tokenizer_default_system(tokenizer, template) -> str`: the default system prompt a named template adopts
  from the model's own chat template when both render alike (SmolLM2, Qwen2), else ""
- `render_conversation(turns, tokenizer, template, *, system="", bot_name="BOT") -> Rendered`
- `encode_conversation(turns, tokenizer, template, *, max_length=None, ...) -> Encoded | None`
- `encode_records(convs, tokenizer, template, *, max_length, kind="chat", system="", ...)
   -> (list[Encoded], EncodeStats)` (batched tokenization; the training path)
- `render_prompt_text(tokenizer, template, turns, *, system=None, bot_name="BOT") -> str` and
  `encode_prompt(...) -> list[int]`: the generation prompt for the last turn (chat, eval, serve).
Stop words (`stop_words_for`, `cut_at_stop`) live in `tunesmith.data.stopwords`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tunesmith.data.conversation import Turn, with_default_system
from tunesmith.data.templates import Template, get_template
from tunesmith.errors import TunesmithError

IGNORE_INDEX = -100
ENCODE_VERSION = 1  # bump when the encoding of the same inputs changes (invalidates caches)


@dataclass(frozen=True)
class TokenizerInfo:
    bos_text: str  # "" when the tokenizer does not start sequences with BOS
    eos_text: str
    specials: tuple[str, ...]  # special token strings (end-of-turn detection for `auto`)
    fast: bool  # offsets available


def tokenizer_info(tokenizer: Any) -> TokenizerInfo:
    cached = getattr(tokenizer, "_tunesmith_info", None)
    if cached is not None:
        return cached
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos_id = tokenizer.bos_token_id
    adds_bos = bos_id is not None and len(full) > len(plain) and full[0] == bos_id and (not plain or plain[0] != bos_id)
    specials = tuple(sorted({str(t) for t in getattr(tokenizer, "all_special_tokens", []) if t}, key=len,
                            reverse=True))
    try:
        tokenizer("a", add_special_tokens=False, return_offsets_mapping=True)
        fast = True
    except (NotImplementedError, TypeError, ValueError):
        fast = False
    info = TokenizerInfo(tokenizer.bos_token if adds_bos else "", tokenizer.eos_token or "", specials, fast)
    try:
        tokenizer._tunesmith_info = info
    except AttributeError:
        pass
    return info


@dataclass(frozen=True)
class Rendered:
    text: str
    spans: tuple[tuple[int, int], ...]  # character ranges with loss
    turn_starts: tuple[int, ...]  # character offset where each turn starts


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


# ----------------------------------------------------------------------------------------- rendering
def _named(turns: Sequence[Turn], template: Template, info: TokenizerInfo, bot_name: str) -> Rendered:
    parts, spans, starts = [], [], []
    pos, cur_turn = 0, -1
    for seg in template.segments(turns, bos=info.bos_text, eos=info.eos_text, bot_name=bot_name):
        if seg.turn != cur_turn:
            starts.append(pos)
            cur_turn = seg.turn
        if seg.with_loss and seg.text:
            if spans and spans[-1][1] == pos:
                spans[-1] = (spans[-1][0], pos + len(seg.text))
            else:
                spans.append((pos, pos + len(seg.text)))
        parts.append(seg.text)
        pos += len(seg.text)
    return Rendered("".join(parts), tuple(spans), tuple(starts))


def _messages(turns: Sequence[Turn]) -> list[dict[str, str]]:
    msgs: list[dict[str, str]] = []
    for i, t in enumerate(turns):
        if t.system and i == 0:
            msgs.append({"role": "system", "content": t.system})
            user = t.input
        elif t.system:  # a mid-conversation system text (a tool result): prompt side of the user message
            user = t.system + ("\n" + t.input if t.input else "")
        else:
            user = t.input
        msgs.append({"role": "user", "content": user})
        if t.output:
            msgs.append({"role": "assistant", "content": t.output})
    return msgs


def _apply(tokenizer: Any, messages: list[dict[str, str]], generation: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise TunesmithError("the tokenizer has no chat template, so prompt template 'auto' cannot be used",
                             "set data.prompt_template to a named template (see `tunesmith list-template`)")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    except Exception as exc:  # jinja2 TemplateError / raise_exception() inside the template
        if type(exc).__module__.startswith("jinja2") or "TemplateError" in type(exc).__name__:
            raise TunesmithError(f"the tokenizer's chat template rejected a conversation ({exc})",
                                 "use a named prompt template (see `tunesmith list-template`)") from None
        raise


def _auto(turns: Sequence[Turn], tokenizer: Any, info: TokenizerInfo) -> Rendered:
    messages = _messages(turns)
    full = _apply(tokenizer, messages, False)
    spans, starts = [], []
    search_from = 0
    a = 0  # index into messages
    for t in turns:
        while messages[a]["role"] != "user":
            a += 1
        starts.append(search_from)
        user_idx = a
        a += 1
        if not t.output:
            continue
        prompt = _apply(tokenizer, messages[: user_idx + 1], True)
        upto = _apply(tokenizer, messages[: a + 1], False)
        base = len(prompt) if full.startswith(prompt) else search_from  # the reply starts after its prompt
        content = t.output if full.startswith(t.output, base) or t.output in full[base:] else t.output.strip()
        start = base if full.startswith(content, base) else full.find(content, base)
        if start < 0 or not content:
            raise TunesmithError("the tokenizer's chat template changes assistant text, so 'auto' cannot mark the "
                                 "loss", "use a named prompt template (see `tunesmith list-template`)")
        content_end = start + len(content)
        consistent = full.startswith(upto) and len(upto) >= content_end
        tail = full[content_end:len(upto)] if consistent else full[content_end:]
        end = content_end
        best = None
        for sp in info.specials:  # the end-of-turn token: the first special token after the reply
            k = tail.find(sp)
            if k >= 0 and (best is None or k < best[0]):
                best = (k, len(sp))
        if best is not None:
            end = content_end + best[0] + best[1]
        elif consistent and tail.strip():
            end = content_end + len(tail.rstrip())
        turn_end = len(upto) if consistent else end
        if t.output_with_loss:
            spans.append((start, end))
        search_from = turn_end
        a += 1
    return Rendered(full, tuple(spans), tuple(starts))


def tokenizer_default_system(tokenizer: Any, template: Template) -> str:
    """The system prompt the tokenizer's own chat template injects when a conversation has none (SmolLM2's
    "You are a helpful AI assistant named SmolLM...", Qwen2's "You are a helpful assistant."), but only when
    `template` renders exactly like that chat template once a system prompt is given; else "".

    A named template that matches the model's own layout thus renders token-identical text with or without
    a system prompt (SPEC §4); a named template of another layout keeps XTuner's rule (no system, no block)."""
    memo = getattr(tokenizer, "_tunesmith_default_system", None)
    if memo is None:
        memo = {}
        try:
            tokenizer._tunesmith_default_system = memo
        except AttributeError:
            pass
    if template.name in memo:
        return memo[template.name]
    found = ""
    if getattr(tokenizer, "chat_template", None) and not template.is_auto:
        try:
            marker = "\x00tunesmith-system\x00"
            user = [{"role": "user", "content": "U"}]
            bare = tokenizer.apply_chat_template(user, tokenize=False)
            with_sys = tokenizer.apply_chat_template([{"role": "system", "content": marker}, *user], tokenize=False)
            head, _, tail = with_sys.partition(marker)
            if tail and bare.startswith(head) and bare.endswith(tail) and len(bare) > len(head) + len(tail):
                candidate = bare[len(head):len(bare) - len(tail)]
                info = tokenizer_info(tokenizer)
                probe = [{"role": "system", "content": candidate}, *user, {"role": "assistant", "content": "A"}]
                mine = template.render([Turn("U", "A", candidate)], bos=info.bos_text, eos=info.eos_text)
                if mine == tokenizer.apply_chat_template(probe, tokenize=False):
                    found = candidate
        except Exception:  # noqa: BLE001 - a template that rejects the probe: no default to adopt
            found = ""
    memo[template.name] = found
    return found


def render_conversation(turns: Sequence[Turn], tokenizer: Any, template: Template | str, *, system: str = "",
                        bot_name: str = "BOT") -> Rendered:
    t = get_template(template) if isinstance(template, str) else template
    turns = with_default_system(turns, system)
    info = tokenizer_info(tokenizer)
    if t.is_auto:
        return _auto(turns, tokenizer, info)
    return _named(with_default_system(turns, tokenizer_default_system(tokenizer, t)), t, info, bot_name)


def _render_text(turns: Sequence[Turn], info: TokenizerInfo) -> Rendered:
    """Plain text (pretrain): [BOS] text EOS, loss on the text and EOS."""
    text = info.bos_text + turns[0].output + info.eos_text
    return Rendered(text, ((len(info.bos_text), len(text)),), (0,))


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


def _encode_slow(rendered: Rendered, tokenizer: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """No offsets (slow tokenizer): tokenize piece by piece along span and turn boundaries."""
    cuts = sorted({0, len(rendered.text), *rendered.turn_starts, *(c for s in rendered.spans for c in s)})
    ids, labels, char_starts = [], [], []
    for a, b in zip(cuts, cuts[1:], strict=False):
        piece = rendered.text[a:b]
        if not piece:
            continue
        pids = tokenizer(piece, add_special_tokens=False)["input_ids"]
        loss = any(s <= a < e for s, e in rendered.spans)
        ids += pids
        labels += pids if loss else [IGNORE_INDEX] * len(pids)
        char_starts += [a] * len(pids)
    return (np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32),
            np.stack([np.asarray(char_starts, dtype=np.int64)] * 2, axis=1).reshape(-1, 2))


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


def encode_records(convs: Iterable[Sequence[Turn]], tokenizer: Any, template: Template | str, *,
                   max_length: int | None, kind: str = "chat", system: str = "", bot_name: str = "BOT",
                   batch_size: int = 256, progress: Callable[[int], None] | None = None
                   ) -> tuple[list[Encoded], EncodeStats]:
    """Encode many conversations (tokenized in batches). kind="text" ignores the template (plain text).
    `progress(n)` is called after each batch with the number of conversations done so far."""
    t = get_template(template) if isinstance(template, str) else template
    info = tokenizer_info(tokenizer)
    if kind == "text" or not t.suffix_as_eos or t.is_auto:
        if not info.eos_text and not t.is_auto:
            raise TunesmithError("the tokenizer has no eos_token, so replies cannot end",
                                 "use a tokenizer with an eos_token, or a template whose SUFFIX ends a turn")
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
            batch.append(_render_text(turns, info))
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


# ----------------------------------------------------------------------------------------- prompts
def render_prompt_text(tokenizer: Any, template: Template | str, turns: Sequence[Turn], *,
                       system: str | None = None, bot_name: str = "BOT") -> str:
    """Text of the prompt asking for the last turn's reply (its `output` is ignored), rendered exactly as in
    training (BOS / EOS / SEP of earlier turns included)."""
    t = get_template(template) if isinstance(template, str) else template
    turns = list(turns)
    turns[-1] = Turn(turns[-1].input, "", turns[-1].system, turns[-1].output_with_loss)
    if system:
        turns = with_default_system(turns, system)
    if t.is_auto:
        return _apply(tokenizer, _messages(turns), True)
    info = tokenizer_info(tokenizer)
    turns = with_default_system(turns, tokenizer_default_system(tokenizer, t))
    return t.render_prompt(turns, bot_name=bot_name, bos=info.bos_text, eos=info.eos_text)


def encode_prompt(tokenizer: Any, template: Template | str, turns: Sequence[Turn], *, system: str | None = None,
                  bot_name: str = "BOT") -> list[int]:
    text = render_prompt_text(tokenizer, template, turns, system=system, bot_name=bot_name)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
