"""Incremental detokenisation: turn a growing list of token ids into text pieces.

Decoding one token at a time is wrong for most tokenizers: sentencepiece drops the leading space of a lone
token ("▁world" decodes to "world"), and a CJK character or an emoji can be split over several byte tokens
that decode to U+FFFD until the last one arrives. `StreamDecoder` decodes a small sliding window that starts
a few tokens back (the "prefix") and emits only the difference, waiting while the text ends in an incomplete
character. The work per token is constant, not proportional to the answer length.
"""

from __future__ import annotations

from collections.abc import Sequence

_REPLACEMENT = "\ufffd"


class StreamDecoder:
    """Feed token ids one by one (or a few at a time); `push` returns the new text they complete."""

    def __init__(self, tokenizer, context_ids: Sequence[int] = (), skip_special_tokens: bool = False, context: int = 4):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # A few ids before the generated ones, so the first generated token gets its leading space right.
        self.ids: list[int] = list(context_ids[-context:]) if context_ids else []
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # everything emitted so far

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(
            list(ids), skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def push(self, token_ids: int | Sequence[int]) -> str:
        if isinstance(token_ids, int):
            self.ids.append(token_ids)
        else:
            self.ids.extend(token_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            piece = new_text[len(prefix_text) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += piece
            return piece
        return ""

    def flush(self) -> str:
        """Whatever is still pending at the end (an incomplete character shows as U+FFFD)."""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        piece = new_text[len(prefix_text) :]
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += piece
        return piece
