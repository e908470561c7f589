"""Held-out loss: the validation loss during training, and the one token-weighted rule that `tunesmith eval`
uses too.

`token_weighted(loss_sum, tokens)` is the rule: the mean cross-entropy per loss token (not a mean of per-sample
means) and its perplexity, exp(mean). `Validation` computes it during training on `data.validation` with the
training step's own forward (the same model, compiled layers included, the same fast-path loss, packing, template
and mixed precision) in eval mode without gradients, over batches of training.batch_size; under DDP / DeepSpeed
each rank scores its share and the sums are added over ranks. Importing this module does not import torch
(`tunesmith eval` imports the rule). Validation draws nothing from the RNGs, so a run
with validation trains exactly as one without.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tunesmith.errors import TunesmithError


def token_weighted(loss_sum: float, tokens: int) -> tuple[float, float]:
    """(mean loss per token, perplexity) of a summed cross-entropy over ``tokens`` loss tokens."""
    if tokens <= 0:
        raise TunesmithError("the held-out samples have no answer tokens to score", "check the data's output fields")
    mean = float(loss_sum) / tokens
    return mean, math.exp(mean) if mean < 700 else math.inf


@dataclass
class HeldOutLoss:
    loss: float
    perplexity: float | None  # None for preference pairs (their loss is not a per-token cross-entropy)
    tokens: int  # loss tokens (preference: pairs)
    preference: dict[str, float] = field(default_factory=dict)  # val_reward_accuracy, ... (train/preference.py)

    def values(self) -> dict[str, float]:
        """What metrics.jsonl and the log get: ``val_loss`` and ``val_ppl``, or the preference numbers."""
        if self.perplexity is None:
            return {"val_loss": self.loss, **self.preference}
        return {"val_loss": self.loss, "val_ppl": self.perplexity}


class Validation:
    """The validation loss of a run: ``due(step)`` says when, ``run(backend)`` computes it.

    ``batches()`` yields this rank's validation batches (the same every time); ``interval``: steps between
    validations (None: only before the first step and at the last, ``total_steps``)."""

    def __init__(self, batches: Callable[[], Iterable[dict[str, Any]]], *, interval: int | None, total_steps: int,
                 device: Any, host_inputs: tuple[str, ...] = ()):
        self.batches, self.interval, self.total_steps = batches, interval, total_steps
        self.device, self.host_inputs = device, host_inputs

    def due(self, step: int) -> bool:
        return step == self.total_steps or (self.interval is not None and step > 0 and step % self.interval == 0)

    def run(self, backend: Any) -> HeldOutLoss:
        import torch

        from tunesmith.train.preference import summarize
        from tunesmith.train.step import take_stats, to_device

        take_stats(backend.module)  # numbers of earlier forwards are not this validation's
        runner = backend.runner
        was_training = runner.training
        runner.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):  # a DataLoader iterator draws a seed
                for batch in self.batches():
                    loss_sum, tokens = backend.forward(to_device(batch, self.device, self.host_inputs))
                    total += torch.stack([loss_sum.detach().double(), tokens.detach().double()])
        finally:
            if was_training:
                runner.train()
        stats = take_stats(backend.module)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
        loss_sum, tokens = total.tolist()
        if stats:  # preference pairs: the mean pair loss and the reward numbers
            if tokens <= 0:
                raise TunesmithError("the held-out data has no pairs to score", "check data.validation")
            return HeldOutLoss(loss_sum / tokens, None, int(tokens), summarize(stats, prefix="val_"))
        loss, ppl = token_weighted(loss_sum, int(tokens))
        return HeldOutLoss(loss, ppl, int(tokens))
