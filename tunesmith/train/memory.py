"""Fit the activations of compiled decoder layers into the GPU before the first step.

With ``training.gradient_checkpointing`` on, eager layers are checkpointed whole (every layer recomputes its
forward in backward). Compiled layers can do better: the compiler keeps the activations that are expensive to
recompute and recomputes the cheap ones, up to a memory budget, and where that is not enough some layers are
checkpointed whole on top. :func:`plan_activations` measures a few plans on the longest micro-batch of the run
and keeps the fastest that fits in ``speed.memory_fraction`` of the card, less the optimizer state still to come
(``models.fast.checkpointing.fit_compiled_activations`` says how). The probe steps change no weight and draw no
random numbers the run would see, and the run's reported peak starts after them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tunesmith.models.fast import FastPaths
from tunesmith.models.fast.checkpointing import ActivationPlan, fit_compiled_activations
from tunesmith.train.step import probe_step

GiB = 1024**3
MARGIN = 0.97  # plans aim 3 % under the card's share (allocator rounding, kernels' workspaces)


def longest_batch(dataset: Any, loader: Any) -> dict[str, Any]:
    """The micro-batch of the ``batch_size`` longest samples (rows) of ``dataset``, collated as ``loader`` does."""
    size = loader.batch_size or 1
    order = sorted(range(len(dataset.lengths)), key=lambda i: -dataset.lengths[i])[:size]
    return loader.collate_fn([dataset[i] for i in order])


def optimizer_state_bytes(params: list[torch.nn.Parameter], name: str, *, deepspeed_stage: int = 0,
                          world_size: int = 1) -> int:
    """Bytes the optimizer will add on the GPU at its first step (the planner runs before it).

    Plain AdamW keeps two moments in the parameter's dtype, the 8-bit variants one byte each; paged states live in
    host-backed memory that the allocator does not count. DeepSpeed ZeRO-1/2 keeps fp32 master weights, fp32
    moments and fp32 gradient partitions (16 bytes a parameter, split over the ranks)."""
    numel = sum(p.numel() for p in params)
    if deepspeed_stage:
        return 16 * numel // max(1, world_size)
    if name.startswith("paged"):
        return 0
    if name.endswith("8bit"):
        return 2 * numel
    return 2 * sum(p.numel() * p.element_size() for p in params)


def planning_wanted(fast: FastPaths, gradient_checkpointing: bool) -> bool:
    """Plan when the layers are compiled on a GPU and checkpointing (memory saving) is asked for."""
    return fast.compiled and fast.device == "cuda" and gradient_checkpointing


def card_budget(memory_fraction: float, device: torch.device, reserved_bytes: int) -> float:
    """Bytes one probe step may peak at: ``memory_fraction`` of the card less a 3 % margin, less what is still
    to come (the optimizer state)."""
    total = torch.cuda.get_device_properties(device).total_memory
    return MARGIN * memory_fraction * total - reserved_bytes


def fit_activations(model: torch.nn.Module, module: torch.nn.Module, params: list[torch.nn.Parameter], cfg: Any,
                    batch: dict[str, Any], *, precision: str, device: torch.device, deepspeed_stage: int = 0,
                    world_size: int = 1) -> ActivationPlan:
    """The activation plan of a run (``train`` and the bench alike): ``speed.memory_fraction`` of the card less the
    optimizer state still to come, probed with the bare loss ``module`` on ``batch`` (the longest micro-batch)."""
    still_to_come = optimizer_state_bytes(params, cfg.training.optimizer, deepspeed_stage=deepspeed_stage,
                                          world_size=world_size)
    return plan_activations(model, probe_step(module, precision, device), batch,
                            card_budget(cfg.speed.memory_fraction, device, still_to_come))


def plan_activations(model: torch.nn.Module, forward_backward: Callable[[dict[str, Any]], None],
                     batch: dict[str, Any], budget_bytes: float) -> ActivationPlan:
    """Choose how compiled layers fit ``budget_bytes`` of CUDA memory, using ``forward_backward(batch)`` (one
    micro-batch, no optimizer step) on the longest batch. Each probe starts with the gradients allocated and
    zeroed, as every micro-batch of an accumulation window after the first does. Gradients the probes leave are
    cleared, the CPU and CUDA random states are as before, and the peak-memory counter starts again afterwards."""

    def run_step() -> None:
        model.zero_grad(set_to_none=False)  # allocated gradients stay: they are there in a real window too
        forward_backward(batch)

    device = torch.device("cuda", torch.cuda.current_device())  # not a parameter's: some may live on the host
    with torch.random.fork_rng(devices=[device]):
        plan = fit_compiled_activations(model, run_step, budget_bytes)
    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()  # what the refused probes reserved goes back to the card
    torch.cuda.reset_peak_memory_stats(device)
    return plan
