"""Optimizer and learning-rate schedule.

Only parameters with ``requires_grad`` go into the optimizer (LoRA / QLoRA train the adapter only).
The schedule is linear warm-up then cosine (or linear, or constant) decay to ``lr * min_lr_ratio``,
computed from the optimizer step, so its whole state is one integer.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tunesmith.errors import TunesmithError

BNB_OPTIMIZERS = {
    "adamw_8bit": "AdamW8bit",
    "paged_adamw_32bit": "PagedAdamW32bit",
    "paged_adamw_8bit": "PagedAdamW8bit",
}


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TunesmithError("the model has no trainable parameters", "check method / lora settings in the config")
    return params


def build_optimizer(params: list[torch.nn.Parameter], training: Any, *, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW from torch, or a bitsandbytes variant (training.optimizer).

    `fused` (the loop sets it for CUDA parameters outside DeepSpeed): one fused kernel for every tensor instead
    of several small kernels per tensor, which matters for LoRA's hundreds of small tensors. A run and its
    resumed continuation use the same kernel, so resume stays exact.
    """
    kwargs = {"lr": training.lr, "betas": tuple(training.betas), "weight_decay": training.weight_decay}
    name = training.optimizer
    if name == "adamw":
        if fused and all(p.is_cuda and p.is_floating_point() for p in params):
            return torch.optim.AdamW(params, fused=True, **kwargs)
        # foreach=False keeps CPU results bit-identical between a run and its resumed continuation
        return torch.optim.AdamW(params, foreach=False, **kwargs)
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise TunesmithError(
            f"training.optimizer {name!r} needs bitsandbytes, which is not installed",
            "pip install bitsandbytes, or set training.optimizer=adamw",
        ) from exc
    return getattr(bnb.optim, BNB_OPTIMIZERS[name])(params, **kwargs)


def lr_factor(step: int, total_steps: int, training: Any) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based) out of `total_steps`."""
    warmup = int(math.ceil(training.warmup_ratio * total_steps))
    if warmup and step < warmup:
        return (step + 1) / warmup  # never exactly 0: the first step already learns a little
    floor = training.min_lr_ratio
    if training.lr_scheduler == "constant":
        return 1.0
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    if training.lr_scheduler == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Schedule:
    """Sets the optimizer's lr for each step; ``state_dict`` is the step counter (resumable)."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, training: Any):
        self.optimizer, self.total_steps, self.training = optimizer, total_steps, training
        self.step_count = 0
        self._apply()

    def _apply(self) -> None:
        lr = self.training.lr * lr_factor(self.step_count, self.total_steps, self.training)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, int]:
        return {"step_count": self.step_count, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step_count = int(state["step_count"])
        self._apply()
