"""Decoding settings, what a generation call returns, and the logits processors every decoder shares (the chat
generator and the batching engine)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingConfig:
    """Decoding settings (XTuner's chat defaults). `temperature <= 0` means greedy."""

    max_new_tokens: int = 2048
    temperature: float = 0.1
    top_k: int = 40
    top_p: float = 0.75
    repetition_penalty: float = 1.0
    seed: int | None = 0

    @property
    def greedy(self) -> bool:
        return self.temperature is None or self.temperature <= 0


@dataclass
class GenerationResult:
    """What one call produced.

    `ids` are the new token ids to keep in the history: everything generated up to and including the token
    that ended the answer (the end-of-turn token, or the token that completed a stop word). `text` is the
    answer as shown, without the stop word.
    """

    ids: list[int]
    text: str
    finish_reason: str  # "stop" (end-of-turn token or stop word) or "length"
    stop: str | None = None  # the stop word / special token text that ended it
    prompt_tokens: int = 0
    prefilled_tokens: int = 0  # prompt ids actually run through the model (the rest came from the cache)
    time_to_first_token: float = 0.0
    decode_seconds: float = 0.0
    timings: dict = field(default_factory=dict)

    @property
    def new_tokens(self) -> int:
        return len(self.ids)

    @property
    def tokens_per_second(self) -> float:
        n = len(self.ids) - 1  # the first token comes from the prefill
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0


def process_logits(logits: torch.Tensor, cfg: SamplingConfig, seen: torch.Tensor | None) -> torch.Tensor:
    """Next-token logits after the repetition penalty (``seen``: a bool mask of tokens already in the text),
    temperature, top-k and top-p (removed tokens get -inf); unchanged but for the penalty when greedy. Rows are
    independent, so a batch of requests goes through in one call."""
    if seen is not None and cfg.repetition_penalty != 1.0:
        p = cfg.repetition_penalty
        logits = torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)
    if cfg.greedy:
        return logits
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k > 0:
        k = min(cfg.top_k, logits.shape[-1])
        kth = torch.topk(logits, k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - cfg.top_p)
        remove[..., -1:] = False
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return logits
