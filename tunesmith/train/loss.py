"""Token-weighted loss: the mean over every target token of the accumulated batch.

A micro-batch returns the *sum* of its per-token losses. The loop counts the target tokens of the whole
accumulation window (all its micro-batches, all ranks) before the first backward, and divides each
micro-batch's sum by that count. Gradient accumulation then adds up to exactly
``sum(all token losses) / all tokens`` -- the same gradient as one big batch -- instead of the mean of
micro-batch means (which over-weights short micro-batches).

Data-parallel wrappers (DDP, DeepSpeed) average gradients over ranks, and DeepSpeed also divides by the
accumulation steps; `loss_scale_for` returns the factor that undoes those so the result stays token-weighted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class CausalLMLoss(nn.Module):
    """Wraps a causal LM so that ``forward(batch) -> (loss_sum, n_tokens)``.

    DDP / DeepSpeed wrap this module, so their forward hooks run; the loss itself comes from the models
    stage (chunked cross-entropy that never materialises the full logits, or the plain path).
    """

    count_key = "num_loss_tokens"  # what a micro-batch's loss sum is divided by, summed over the window

    def __init__(self, model: nn.Module, loss_options: dict[str, Any] | None = None):
        super().__init__()
        self.model = model
        self.loss_options = dict(loss_options or {})

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        from tunesmith.models.fast import model_loss_sum

        return model_loss_sum(self.model, batch, **self.loss_options)


def window_tokens(batches: Sequence[dict[str, Any]], device: torch.device | str = "cpu",
                  key: str = "num_loss_tokens") -> torch.Tensor:
    """Target tokens (or, with ``key="num_pairs"``, preference pairs) in an accumulation window, summed over all
    ranks (one all-reduce)."""
    total = torch.tensor(float(sum(int(b[key]) for b in batches)), device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return total


def loss_scale_for(world_size: int, grad_accum_divisor: int = 1) -> float:
    """Factor for `loss_sum / window_tokens` so the gradient wrapper's averaging is undone.

    DDP averages over `world_size` ranks; DeepSpeed additionally divides by the accumulation steps
    (pass them as `grad_accum_divisor`). Plain single-process training: 1.
    """
    return float(world_size * grad_accum_divisor)


def scaled_micro_loss(loss_sum: torch.Tensor, total_tokens: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The micro-batch's share of the window's token-mean loss (what `backward` is called on)."""
    return loss_sum * (scale / total_tokens.clamp(min=1.0))
