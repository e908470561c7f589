"""Fit the activations of compiled decoder layers into the GPU before the first step.

With ``training.gradient_checkpointing`` on, eager layers are checkpointed whole (every layer recomputes its
forward in backward). Compiled layers can do better: the compiler keeps the activations that are expensive to
recompute and recomputes the cheap ones, up to a memory budget. :func:`plan_compiled_activations` measures a
few budgets on the longest micro-batch of the run and keeps the largest that fits in ``speed.memory_fraction``
of the card (``models.fast.checkpointing.fit_compiled_activations``), falling back to whole-layer checkpointing
when none does. The probe steps change no weight and draw no random numbers the run would see.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

GiB = 1024**3


def longest_batch(dataset: Any, loader: Any) -> dict[str, Any]:
    """The micro-batch of the ``batch_size`` longest samples (rows) of ``dataset``, collated as ``loader`` does."""
    size = loader.batch_size or 1
    order = sorted(range(len(dataset.lengths)), key=lambda i: -dataset.lengths[i])[:size]
    return loader.collate_fn([dataset[i] for i in order])


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], name: str) -> int:
    """Bytes the optimizer's state will take on the GPU at its first step (0 when it exists already: resume).
    AdamW keeps two moments in the parameter's dtype, the 8-bit variants one byte each; paged states live in
    host-backed memory that the allocator does not count."""
    if any(optimizer.state.values()) or name.startswith("paged"):
        return 0
    numel = sum(p.numel() for p in params)
    if name.endswith("8bit"):
        return 2 * numel
    return 2 * sum(p.numel() * p.element_size() for p in params)


def plan_compiled_activations(model: torch.nn.Module, forward_backward: Callable[[dict[str, Any]], None],
                              batch: dict[str, Any], budget_bytes: float) -> str:
    """Choose how compiled layers fit ``budget_bytes`` of CUDA memory, using ``forward_backward(batch)`` (one
    micro-batch, no optimizer step) on the longest batch; returns a line for the log. Gradients the probes
    leave are cleared; the CPU and CUDA random states are as before."""
    from tunesmith.models.fast.checkpointing import decoder_layers, fit_compiled_activations

    def run_step() -> None:
        model.zero_grad(set_to_none=True)
        forward_backward(batch)

    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device]):
        fraction, probes = fit_compiled_activations(model, run_step, budget_bytes)
    model.zero_grad(set_to_none=True)
    measured = ", ".join(f"{peak / GiB:.1f} GiB at {f:g}" for f, peak in probes)
    if fraction is None:
        layers = len(decoder_layers(model))
        return (f"activation memory: compiled layers do not fit {budget_bytes / GiB:.1f} GiB even keeping "
                f"{100 * probes[-1][0]:g}% of their activations ({measured}); all {layers} layers checkpointed whole")
    return (f"activation memory: compiled layers keep {100 * fraction:.0f}% of their activations, no layer "
            f"checkpointed whole (budget {budget_bytes / GiB:.1f} GiB; peaks {measured})")


def planning_wanted(model: torch.nn.Module, cfg: Any, device: torch.device) -> bool:
    """Plan when the layers are compiled, on CUDA, and checkpointing (memory saving) is asked for."""
    applied = getattr(model, "tunesmith_fast_paths", None) or {}
    return bool(applied.get("compiled_layers")) and device.type == "cuda" and cfg.training.gradient_checkpointing


def card_budget(cfg: Any, device: torch.device, optimizer_bytes: int) -> float:
    """Bytes the step may peak at: ``speed.memory_fraction`` of the card, less the optimizer state to come."""
    total = torch.cuda.get_device_properties(device).total_memory
    return cfg.speed.memory_fraction * total - optimizer_bytes


def no_sync(runner: torch.nn.Module):
    """DDP's ``no_sync`` (the probes must not all-reduce), else nothing."""
    if isinstance(runner, torch.nn.parallel.DistributedDataParallel):
        return runner.no_sync()
    return contextlib.nullcontext()
