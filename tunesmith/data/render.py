"""Rendering: a conversation + tokenizer + template -> the text the model sees, with the character spans that
carry loss (the encoder turns them into labels) and where each turn starts.

BOS follows the tokenizer: it is inserted only if the tokenizer itself starts sequences with one
(Llama / InternLM yes, Qwen / SmolLM2 no); in multi-turn samples a turn starts with BOS only when the previous
turn ended with EOS (XTuner 0.1.23). SEP is never trained on. `auto` uses the tokenizer's own Jinja
chat template (including any default system prompt it injects).

Public API:
- `tokenizer_info(tokenizer) -> TokenizerInfo` (bos / eos text actually used)
- `tokenizer_default_system(tokenizer, template) -> str`: the default system prompt a named template adopts
  from the model's own chat template when both render alike (SmolLM2, Qwen2), else ""
- `render_conversation(turns, tokenizer, template, *, system="", bot_name="BOT") -> Rendered`, and
  `render_text(turns, info)` for plain text (pretrain)
- `render_prompt_text(tokenizer, template, turns, *, system=None, bot_name="BOT") -> str`: the generation prompt
  for the last turn (chat, eval, serve), rendered exactly as in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tunesmith.data.conversation import Turn, with_default_system
from tunesmith.data.templates import Template, get_template
from tunesmith.errors import TunesmithError


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
        # transformers 5's Python-only tokenizers ignore the request instead of refusing it: look for the offsets
        fast = "offset_mapping" in tokenizer("a", add_special_tokens=False, return_offsets_mapping=True)
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
    if not template.adopt_model_system:
        return ""
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


def render_text(turns: Sequence[Turn], info: TokenizerInfo) -> Rendered:
    """Plain text (pretrain): [BOS] text EOS, loss on the text and EOS."""
    text = info.bos_text + turns[0].output + info.eos_text
    return Rendered(text, ((len(info.bos_text), len(text)),), (0,))


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
