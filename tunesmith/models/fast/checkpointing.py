"""Activation-checkpointing policy: how many decoder layers keep their activations instead of recomputing.

transformers' decoder layers (``GradientCheckpointingLayer``) each check their own ``gradient_checkpointing``
flag, so after ``model.gradient_checkpointing_enable(...)`` a policy is just a choice of layers to leave out.
Every layer left out saves its forward recompute in backward (with no layer checkpointed a LoRA step does about
4N instead of 6N FLOPs per token) and costs that layer's activations in memory for the whole step.

Compiled layers have a finer tool: the compiler's partitioner can keep part of a layer's activations and
recompute the rest op by op (``activation_memory_budget``). :func:`fit_compiled_activations` combines the two:
the largest activation budget that fits, and where even a small one does not, just enough layers checkpointed
whole on top of it (the train loop and the bench both use it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers that can checkpoint themselves, in order."""
    return [m for m in model.modules() if hasattr(m, "gradient_checkpointing") and type(m).__name__.endswith("Layer")]


def set_checkpointed_layers(model: nn.Module, keep_activations: int) -> int:
    """With checkpointing enabled, let the last ``keep_activations`` layers keep their activations (no
    recompute). ``0`` = full checkpointing; ``>= number of layers`` = none. Returns the number checkpointed."""
    layers = decoder_layers(model)
    n = len(layers)
    keep = max(0, min(n, keep_activations))
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < n - keep
    return n - keep


# ------------------------------------------------------------------- compiled layers: the compiler recomputes


def set_activation_budget(fraction: float | None) -> None:
    """The fraction of its usual activations the compiler's partitioner may keep in compiled layers (``None`` /
    1.0: its default min-cut choice). Below 1 it recomputes in backward the activations that are cheapest per byte
    until the rest fits (selective checkpointing, chosen op by op). Read when a graph is compiled: compile (or
    reset and recompile) after setting it."""
    import torch._functorch.config as functorch_config

    functorch_config.activation_memory_budget = 1.0 if fraction is None else float(fraction)


def cuda_peak(run_step) -> float:
    """Peak CUDA memory (bytes) allocated while ``run_step()`` runs."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    run_step()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated())


GiB = 1024**3


@dataclass(frozen=True)
class ActivationPlan:
    """How compiled layers hold their activations: the partitioner's budget ``fraction`` in every layer, and the
    first ``whole_layers`` of ``layers`` checkpointed whole on top (recomputed in backward). ``peak`` is the
    measured peak of one step with this plan; ``probes`` every measurement ``(fraction, whole layers, peak)``."""

    fraction: float
    whole_layers: int
    layers: int
    peak: float
    budget: float
    probes: tuple[tuple[float, int, float], ...]

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget

    def describe(self) -> str:
        measured = ", ".join(f"{'whole' if w == self.layers else f'{100 * f:.0f}%' + (f'+{w} whole' if w else '')}"
                             f" {p / GiB:.1f}" for f, w, p in self.probes)
        head = (f"activation plan: compiled layers keep {100 * self.fraction:.0f}% of their activations, "
                f"{self.whole_layers}/{self.layers} layers checkpointed whole; peak {self.peak / GiB:.1f} GiB "
                f"of a {self.budget / GiB:.1f} GiB budget")
        if not self.fits:
            head += " (nothing tried fits: this is the least memory measured; lower data.max_length or batch_size)"
        return f"{head} (probes, GiB: {measured})"


def fit_compiled_activations(model: nn.Module, run_step, budget_bytes: float, *, peak_of=cuda_peak) -> ActivationPlan:
    """Fit the activations of compiled decoder layers into ``budget_bytes`` (the peak one step may reach; the
    caller keeps its safety margin out of it).

    ``run_step()`` runs one forward + backward of the longest micro-batch and leaves no gradients behind that
    the next call would add to. Each measurement runs it twice (the first call compiles when the graphs are new)
    and reads the peak of the second (``peak_of(run_step)``); a step that runs out of memory does not fit.

    1. Budget 1.0 (the compiler's own choice), no layer whole: the fastest plan. Done if it fits.
    2. Every layer whole, same graphs (no compilation): the least memory there is. If even that does not fit,
       it is the answer (the run may still fit: the budget has a margin, the card may have more).
    3. The budget ``f`` on the straight line between the two peaks at the limit (peak memory falls faster near
       1 than near 0, so the line lies above the curve and ``f`` fits with room), compiled once more.
    4. If ``f`` alone does not fit, just enough layers checkpointed whole on top of it (the per-layer cost is
       read off the measurements), growing until the measured peak fits.

    Whatever is chosen, no plan that was measured and refused used less memory than it (when nothing fits, the
    least memory measured wins). At most two compilations; the graphs of the chosen plan are left in place.
    """
    import torch

    n = len(decoder_layers(model))
    limit = budget_bytes
    probes: list[tuple[float, int, float]] = []
    compiled_at: list[float] = []

    def compile_at(fraction: float) -> None:
        set_activation_budget(fraction)
        torch._dynamo.reset()
        compiled_at.append(fraction)

    def measure(whole: int) -> float:
        set_checkpointed_layers(model, n - whole)
        try:
            run_step()
            peak = peak_of(run_step)
        except torch.OutOfMemoryError:
            peak = math.inf
            torch.cuda.empty_cache()
        probes.append((compiled_at[-1], whole, peak))
        return peak

    def plan(fraction: float, whole: int, peak: float) -> ActivationPlan:
        if compiled_at[-1] != fraction:
            compile_at(fraction)
        set_checkpointed_layers(model, n - whole)
        return ActivationPlan(fraction, whole, n, peak, budget_bytes, tuple(probes))

    compile_at(1.0)
    full = measure(0)
    if full <= limit or n == 0:
        return plan(1.0, 0, full)
    floor = measure(n)
    if floor > limit:
        return plan(1.0, n, floor)
    span = full - floor if math.isfinite(full) else 8 * max(floor, 1.0)  # an unmeasured top: assume a wide span
    fraction = min(0.9, max(0.01, (limit - floor) / max(span, 1.0)))
    compile_at(fraction)
    peak = measure(0)
    if peak <= limit:
        return plan(fraction, 0, peak)
    per_layer = max((min(peak, full if math.isfinite(full) else peak) - floor) / n, 1.0)
    whole = 0
    while whole < n:
        over = (peak - limit) if math.isfinite(peak) else per_layer * (n - whole)
        whole = min(n, whole + max(1, math.ceil(over / per_layer)))
        peak = measure(whole)
        if peak <= limit:
            return plan(fraction, whole, peak)
    best = min(probes, key=lambda p: (p[2], -p[0], p[1]))  # least memory; on a tie the larger budget, fewer whole
    return plan(best[0], best[1], best[2])
