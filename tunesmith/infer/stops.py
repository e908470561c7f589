"""Incremental stop-word matching on streamed text.

XTuner decodes the whole sequence after every token and compares its tail with each stop word, which is
quadratic in the answer length. `StopMatcher` looks only at the text that is new since the last call plus the
few characters before it that could begin a stop word, and it holds back a tail that might still turn into a
stop word, so streamed text never shows half of one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class StopHit:
    """Where the text stopped: the text before the stop word, and which word it was."""

    text: str
    word: str


class StopMatcher:
    """Feed new text piece by piece; get back the text that is safe to show, or a `StopHit`.

    >>> m = StopMatcher(["<eoa>"])
    >>> m.feed("Hello <e")
    'Hello '
    >>> hit = m.feed("oa> more")
    >>> (hit.text, hit.word)
    ('', '<eoa>')
    """

    def __init__(self, stop_words: Iterable[str]):
        self.stop_words = tuple(dict.fromkeys(w for w in stop_words if w))
        self._longest = max((len(w) for w in self.stop_words), default=0)
        self._held = ""  # text not yet shown because it may be the start of a stop word
        self.stopped: StopHit | None = None

    def feed(self, new_text: str) -> str | StopHit:
        """Add `new_text`. Returns the text that may be shown now (possibly ''), or the `StopHit` when a stop
        word is complete (its `.text` is what remains to be shown before the stop word)."""
        if self.stopped is not None:
            return self.stopped
        if not self.stop_words:
            return new_text
        window = self._held + new_text
        # The earliest stop word wins; only `window` can contain a new match because everything before it was
        # shown already and could not have been part of a stop word.
        best: tuple[int, str] | None = None
        for word in self.stop_words:
            at = window.find(word)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, word)
        if best is not None:
            self._held = ""
            self.stopped = StopHit(window[: best[0]], best[1])
            return self.stopped
        keep = self._partial_suffix(window)
        self._held = window[len(window) - keep :] if keep else ""
        return window[: len(window) - keep]

    def flush(self) -> str:
        """The held-back tail at the end of generation (it never became a stop word)."""
        out, self._held = self._held, ""
        return out

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop word."""
        for n in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[-n:]
            if any(w.startswith(tail) for w in self.stop_words):
                return n
        return 0


def merge_stop_words(*groups: Iterable[str] | None) -> list[str]:
    """Union of stop-word lists in order, without empties or duplicates."""
    out: list[str] = []
    for group in groups:
        for word in group or ():
            if word and word not in out:
                out.append(word)
    return out
