"""A chat session: the conversation as token ids, extended turn by turn, never re-tokenised.

XTuner keeps the history as a string, decodes the whole output after each reply and encodes it again, which
changes the tokens the model saw (and could duplicate BOS). Here the ids of a reply are exactly the ids the
model produced; only the new text around them (the end of the reply's turn: SUFFIX / EOS / SEP, and the next
instruction) is tokenised. That text comes from the same renderer as training (`tunesmith.data.render`), as the
difference between the rendering of the conversation before and after the new turn, so turn 2's prompt equals
the template's rendering of the whole conversation.

When the conversation no longer fits the model's context, the oldest turns are dropped (the system prompt
is kept) and the session says so through `notice`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from tunesmith.data.conversation import Turn
from tunesmith.data.render import render_prompt_text
from tunesmith.data.stopwords import stop_words_for
from tunesmith.data.templates import Template, get_template
from tunesmith.errors import TunesmithError
from tunesmith.infer.generate import Generator
from tunesmith.infer.sampling import GenerationResult, SamplingConfig
from tunesmith.infer.stops import merge_stop_words

RAW_TEMPLATE = Template("raw", system="{system}\n", instruction="{input}")


def resolve_template(name: str | Template | None, tokenizer) -> Template:
    """A named template (or a Template), `auto` (the tokenizer's chat template), or None: `auto` when the
    tokenizer has a chat template, else the raw text (XTuner's behaviour without --prompt-template)."""
    if isinstance(name, Template):
        return name
    if name is None:
        return get_template("auto") if getattr(tokenizer, "chat_template", None) else RAW_TEMPLATE
    if name in ("raw", "none"):
        return RAW_TEMPLATE
    template = get_template(name)
    if template.is_auto and not getattr(tokenizer, "chat_template", None):
        raise TunesmithError(
            "--prompt-template auto needs the tokenizer's chat template, and this tokenizer has none",
            "name a template instead, e.g. --prompt-template internlm_chat (`tunesmith list-template` lists them)",
        )
    return template


@dataclass
class _Open:
    """The turn being answered: where its reply starts in `ids`, and the reply text so far."""

    turn: Turn
    out_start: int
    output: str = ""


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class ChatSession:
    """One conversation with a model.

    >>> session = ChatSession(generator, template="auto", system="You are brief.")
    >>> reply = session.ask("What is the capital of France?", on_text=print)
    """

    def __init__(
        self,
        generator: Generator,
        template: Template | str | None = None,
        *,
        system: str = "",
        bot_name: str = "BOT",
        sampling: SamplingConfig | None = None,
        stop_words: Sequence[str] = (),
        max_context: int | None = None,
        notice: Callable[[str], None] = _stderr,
    ):
        self.generator = generator
        self.tokenizer = generator.tokenizer
        self.template = resolve_template(template, self.tokenizer)
        self.system = system
        self.bot_name = bot_name
        self.sampling = sampling or SamplingConfig()
        base = stop_words_for(self.template, self.tokenizer) if self.template.name != "raw" else [
            self.tokenizer.eos_token or ""]
        self.stop_words = merge_stop_words(base, stop_words)
        self.stop_token_ids = self._single_token_ids(self.stop_words)
        self.max_context = max_context or generator.max_positions or None
        self.notice = notice
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the conversation (RESET)."""
        self.turns: list[Turn] = []
        self.ids: list[int] = []
        self._out_starts: list[int] = []
        self._text = ""  # rendering that `ids` encode (prompt of the last turn + its reply)
        self._open: _Open | None = None
        self.generator.reset()

    @property
    def prompt_ids(self) -> list[int]:
        return list(self.ids)

    @property
    def reply_so_far(self) -> str:
        """The open turn's reply text (tool results included)."""
        return self._open.output if self._open is not None else ""

    def _single_token_ids(self, words: Sequence[str]) -> list[int]:
        """Stop words that are one special token (<|im_end|>, <eoa>) also stop by id."""
        out = []
        specials = set(getattr(self.tokenizer, "all_special_tokens", []) or [])
        added = getattr(self.tokenizer, "get_added_vocab", lambda: {})() or {}
        for word in words:
            if word in specials or word in added:
                ids = self.tokenizer.convert_tokens_to_ids([word])
                if ids and ids[0] is not None and ids[0] != getattr(self.tokenizer, "unk_token_id", None):
                    out.append(int(ids[0]))
        return out

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _render(self, turns: Sequence[Turn]) -> str:
        return render_prompt_text(self.tokenizer, self.template, turns, system=self.system or None,
                                  bot_name=self.bot_name)

    def _text_of(self, ids: Sequence[int], context: Sequence[int]) -> str:
        ctx = list(context[-4:])
        full = self.tokenizer.decode(ctx + list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        head = self.tokenizer.decode(ctx, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return full[len(head):]

    # ------------------------------------------------------------------ turns
    def begin_turn(self, text: str, *, system: str = "") -> list[int]:
        """Add a user turn (and, for tool results, its non-loss `system` text); returns the prompt ids."""
        if self._open is not None:
            self.end_turn()
        turn = Turn(text, "", system)
        saved = (list(self.ids), self._text, list(self._out_starts), list(self.turns))
        full = self._render([*self.turns, turn])
        if self.turns and full.startswith(self._text):
            delta = full[len(self._text):]
            self.ids += self._encode(delta)
        else:
            if self.turns:
                self.notice("[the template re-renders earlier turns; the history is re-tokenised]")
            self.ids = self._encode(full)
        self._text = full
        self._open = _Open(turn, len(self.ids))
        self._saved = saved
        try:
            self._fit_context()
        except TunesmithError:
            self.ids, self._text, self._out_starts, self.turns = saved
            self._open = None
            raise
        return list(self.ids)

    def generate(
        self,
        *,
        on_text: Callable[[str], None] | None = None,
        stop_words: Sequence[str] = (),
        keep_stop: bool = False,
        sampling: SamplingConfig | None = None,
    ) -> GenerationResult:
        """Continue the open turn's reply. The reply's ids join the history; with `keep_stop` the stop word's
        ids stay in it too (the MOSS plugin flow continues after `<eoc>`)."""
        if self._open is None:
            raise RuntimeError("begin_turn() first")
        words = merge_stop_words(self.stop_words, stop_words)
        result = self.generator.generate(
            self.ids, sampling or self.sampling, stop_words=words,
            stop_token_ids=self.stop_token_ids + self._single_token_ids(stop_words), on_text=on_text,
        )
        body = list(result.ids)
        if result.finish_reason == "stop" and not keep_stop:
            body = self._trim_to(body, result.text)
        text = self._text_of(body, self.ids) if keep_stop else result.text
        self.ids += body
        self._open.output += text
        self._text += text
        return result

    def _trim_to(self, ids: list[int], text: str) -> list[int]:
        """Drop the trailing ids that make up the stop (an end-of-turn id, or a stop word's tokens)."""
        keep = len(ids)
        while keep > 0 and len(self._text_of(ids[:keep], self.ids)) > len(text):
            keep -= 1
        return ids[:keep]

    def add_to_reply(self, text: str) -> None:
        """Insert text into the open reply (a tool result the model then continues from)."""
        if self._open is None:
            raise RuntimeError("begin_turn() first")
        self.ids += self._encode(text)
        self._open.output += text
        self._text += text

    def abort_turn(self) -> None:
        """Forget the open turn (its message and any partial reply), e.g. after Ctrl-C."""
        if self._open is not None:
            self.ids, self._text, self._out_starts, self.turns = self._saved
            self._open = None

    def end_turn(self) -> Turn:
        """Close the open turn; its end-of-turn text joins the history with the next `begin_turn`."""
        if self._open is None:
            raise RuntimeError("no open turn")
        turn = replace(self._open.turn, output=self._open.output)
        self.turns.append(turn)
        self._out_starts.append(self._open.out_start)
        self._open = None
        return turn

    def ask(self, text: str, *, system: str = "", on_text: Callable[[str], None] | None = None) -> GenerationResult:
        """One whole turn: the user's text in, the reply out (streamed to `on_text`)."""
        self.begin_turn(text, system=system)
        result = self.generate(on_text=on_text)
        self.end_turn()
        return result

    # ------------------------------------------------------------------ context
    def _fit_context(self) -> None:
        if not self.max_context:
            return
        reserve = min(self.sampling.max_new_tokens, self.max_context // 2)
        budget = self.max_context - reserve
        dropped = 0
        while len(self.ids) > budget and self.turns:
            # drop the oldest turn; the next one becomes the first (it gets BOS and the system prompt again)
            self.turns.pop(0)
            self._out_starts.pop(0)
            dropped += 1
            if self.turns:
                first = replace(self.turns[0], output="")
                head_text = self._render([first])
                head = self._encode(head_text)
                cut = self._out_starts[0]
            else:
                head_text = self._render([self._open.turn])
                head = self._encode(head_text)
                cut = self._open.out_start
            shift = len(head) - cut
            self.ids = head + self.ids[cut:]
            self._out_starts = [s + shift for s in self._out_starts]
            self._open.out_start += shift
            self._text = self._render([*self.turns, self._open.turn]) + self._open.output
        if dropped:
            self.notice(
                f"[the conversation outgrew the context ({self.max_context} tokens): dropped the {dropped} oldest "
                f"turn{'s' if dropped > 1 else ''}, kept the {len(self.turns)} most recent]"
            )
        if len(self.ids) > budget:
            raise TunesmithError(
                f"the input is too long: {len(self.ids)} tokens, and the model takes {self.max_context} "
                f"({reserve} kept for the answer)",
                "shorten the message or lower --max-new-tokens",
            )
