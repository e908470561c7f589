"""A generation request, the engine's counters, and the decoding state of one request inside a batch."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tunesmith.infer.detok import StreamDecoder
from tunesmith.infer.sampling import GenerationResult, SamplingConfig, process_logits
from tunesmith.infer.stops import StopHit, StopMatcher


@dataclass
class Request:
    """One generation job. `sink(kind, value)` receives ("text", piece), then ("done", result) or ("error", exc)."""

    prompt_ids: list[int]
    sampling: SamplingConfig
    stop_words: list[str]
    stop_token_ids: list[int]
    sink: Callable[[str, object], None]
    cancel: threading.Event = field(default_factory=threading.Event)
    id: int = 0
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class EngineStats:
    requests: int = 0
    batches: int = 0
    batched_requests: int = 0  # requests that ran in a batch of 2 or more
    largest_batch: int = 0
    cancelled: int = 0


class BatchRow:
    """Decoding state of one request inside a batch (mirrors `Generator.stream`'s bookkeeping)."""

    def __init__(self, req: Request, tokenizer, eos_ids: set[int], device, vocab_size: int, max_positions: int):
        self.req = req
        cfg = req.sampling
        self.max_new = cfg.max_new_tokens
        if max_positions:
            self.max_new = max(0, min(self.max_new, max_positions - len(req.prompt_ids)))
        self.stop_ids = set(eos_ids) | {int(i) for i in req.stop_token_ids}
        self.decoder = StreamDecoder(tokenizer, context_ids=req.prompt_ids)
        self.matcher = StopMatcher(req.stop_words)
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.parts: list[str] = []
        self.finish: str | None = None
        self.stop: str | None = None
        self.rng = None
        if not cfg.greedy:
            self.rng = torch.Generator(device=device)
            self.rng.manual_seed(0 if cfg.seed is None else int(cfg.seed))
        self.seen = None
        if cfg.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, vocab_size, dtype=torch.bool, device=device)
            self.seen[0, torch.tensor(req.prompt_ids, device=device).clamp_(max=vocab_size - 1)] = True
        self.t0 = req.queued_at
        self.ttft = 0.0

    def choose(self, logits: torch.Tensor) -> int:
        cfg = self.req.sampling
        logits = process_logits(logits, cfg, self.seen)
        if cfg.greedy:
            return int(logits.argmax(dim=-1).item())
        return int(torch.multinomial(logits.softmax(dim=-1), 1, generator=self.rng).item())

    def take(self, tok: int) -> None:
        """Handle one new id: emit the text it completes, or end the row."""
        if not self.ids:
            self.ttft = time.perf_counter() - self.t0
        self.ids.append(tok)
        if self.seen is not None:
            self.seen[0, min(tok, self.seen.shape[1] - 1)] = True
        if tok in self.stop_ids:
            self.finish, self.stop = "stop", self.tokenizer.decode([tok])
            return self._close()
        piece = self.decoder.push(tok)
        shown = self.matcher.feed(piece) if piece else ""
        if isinstance(shown, StopHit):
            self.finish, self.stop = "stop", shown.word
            return self._close()
        self._emit(shown)
        if len(self.ids) >= self.max_new:
            self.finish = "length"
            self._close()

    def _emit(self, text: str) -> None:
        if text:
            self.parts.append(text)
            self.req.sink("text", text)

    def _close(self) -> None:
        if self.matcher.stopped is not None:
            tail = self.matcher.stopped.text
        elif self.finish == "cancelled":
            tail = ""
        else:
            shown = self.matcher.feed(self.decoder.flush()) if self.finish == "length" else ""
            if isinstance(shown, StopHit):
                self.finish, self.stop, tail = "stop", shown.word, shown.text
            else:
                tail = shown + self.matcher.flush()
        self._emit(tail)

    def result(self, decode_s: float) -> GenerationResult:
        return GenerationResult(ids=self.ids, text="".join(self.parts), finish_reason=self.finish or "length",
                                stop=self.stop, prompt_tokens=len(self.req.prompt_ids),
                                prefilled_tokens=len(self.req.prompt_ids), time_to_first_token=self.ttft,
                                decode_seconds=decode_s)
