"""Activation-checkpointing policy: how many decoder layers keep their activations instead of recomputing.

transformers' decoder layers (``GradientCheckpointingLayer``) each check their own ``gradient_checkpointing``
flag, so after ``model.gradient_checkpointing_enable(...)`` a policy is just a choice of layers to leave out.
Every layer left out saves its forward recompute in backward (with no layer checkpointed a LoRA step does about
4N instead of 6N FLOPs per token) and costs that layer's activations in memory for the whole step.
:func:`layers_within_budget` turns a memory budget into a layer count from two measured peaks, and
:func:`auto_keep_activations` measures those peaks and applies the result.

Compiled layers have a finer tool: the compiler's partitioner can keep part of a layer's activations and
recompute the rest op by op (``activation_memory_budget``). :func:`fit_compiled_activations` finds the largest
such budget that fits with no whole layer checkpointed (the train loop and the bench both use it).
"""

from __future__ import annotations

import math

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


def layers_within_budget(peak_full: float, peak_probe: float, probe_layers: int, budget: float, n_layers: int) -> int:
    """How many layers may keep activations under ``budget`` bytes, given the peak with full checkpointing and
    the peak with ``probe_layers`` layers keeping theirs (both measured on the same step)."""
    if probe_layers <= 0:
        return 0
    per_layer = max(1.0, (peak_probe - peak_full) / probe_layers)
    return int(max(0, min(n_layers, (budget - peak_full) // per_layer)))


def auto_keep_activations(model: nn.Module, run_step, budget_bytes: float, probe_layers: int | None = None) -> int:
    """Measure, then set, how many layers keep their activations within ``budget_bytes`` of CUDA memory.

    ``run_step()`` runs one forward + backward of a representative (longest) micro-batch; it is called twice:
    all layers checkpointed, then ``probe_layers`` (default an eighth) not. The caller zeroes the gradients
    afterwards (the probe steps accumulate them). Memory that appears only later (optimizer states before the
    first ``optimizer.step()``) must already exist or be taken off the budget. A 3 % margin is kept under the
    budget. Returns the count set.
    """
    import torch

    layers = decoder_layers(model)
    if not torch.cuda.is_available() or not layers:
        set_checkpointed_layers(model, 0)
        return 0
    probe = probe_layers or max(1, len(layers) // 8)
    peaks = []
    for keep in (0, probe):
        set_checkpointed_layers(model, keep)
        peaks.append(cuda_peak(run_step))
    keep = layers_within_budget(peaks[0], peaks[1], probe, budget_bytes * 0.97, len(layers))
    set_checkpointed_layers(model, keep)
    return keep


# ------------------------------------------------------------------- compiled layers: the compiler recomputes

# fractions tried by choose_activation_budget, from most kept to least
BUDGET_PROBES = (1.0, 0.25, 0.05)


def set_activation_budget(fraction: float | None) -> None:
    """The fraction of its usual activations the compiler's partitioner may keep in compiled layers (``None`` /
    1.0: its default min-cut choice). Below 1 it recomputes in backward the activations that are cheapest per byte
    until the rest fits (selective checkpointing, chosen op by op). Read when a graph is compiled: compile (or
    reset and recompile) after setting it."""
    import torch._functorch.config as functorch_config

    functorch_config.activation_memory_budget = 1.0 if fraction is None else float(fraction)


def choose_activation_budget(peak_at, budget_bytes: float, probes=BUDGET_PROBES) -> float | None:
    """The largest activation budget whose step fits ``budget_bytes``, or ``None`` when even the smallest probe
    does not fit (then whole-layer checkpointing has to help).

    ``peak_at(fraction)`` compiles the layers with that fraction, runs one step and returns its peak memory. The
    probes are measured from the most kept down until one fits; the answer is interpolated between the last
    probe that did not fit and the first that did. Peak memory falls faster near 1 than near 0 (the partitioner
    drops its least useful activations first), so the straight line between two probes lies above the curve:
    the interpolated fraction fits. A 3 % margin is kept under the budget."""
    limit = budget_bytes * 0.97
    above: tuple[float, float] | None = None
    for fraction in probes:
        peak = peak_at(fraction)
        if peak <= limit:
            if above is None:
                return fraction
            hi, hi_peak = above
            return fraction + (hi - fraction) * (limit - peak) / max(hi_peak - peak, 1.0)
        above = (fraction, peak)
    return None


def cuda_peak(run_step) -> float:
    """Peak CUDA memory (bytes) allocated while ``run_step()`` runs."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    run_step()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated())


def fit_compiled_activations(model: nn.Module, run_step, budget_bytes: float, *, peak_of=cuda_peak,
                             probes=BUDGET_PROBES) -> tuple[float | None, list[tuple[float, float]]]:
    """Fit the activations of compiled decoder layers into ``budget_bytes``; returns the activation budget set
    (``None``: even the smallest probe did not fit, so every layer is checkpointed whole instead) and the
    measured ``(fraction, peak bytes)`` probes.

    ``run_step()`` runs one forward + backward of the longest micro-batch and leaves no gradients behind that
    the next call would add to; each probe compiles the layers again (first call) and measures the second
    (``peak_of(run_step)``). A probe that runs out of memory does not fit. Leaves the compiled graphs of the
    last probe in place when that is the answer, else resets them (the next step compiles with the answer)."""
    import torch

    n = len(decoder_layers(model))
    measured: list[tuple[float, float]] = []

    def peak_at(fraction: float) -> float:
        set_activation_budget(fraction)
        torch._dynamo.reset()
        set_checkpointed_layers(model, n)
        try:
            run_step()
            peak = peak_of(run_step)
        except torch.OutOfMemoryError:
            peak = math.inf
            torch.cuda.empty_cache()
        measured.append((fraction, peak))
        return peak

    fraction = choose_activation_budget(peak_at, budget_bytes, probes)
    set_activation_budget(fraction)
    if fraction is None:
        set_checkpointed_layers(model, 0)
    if fraction != measured[-1][0]:
        torch._dynamo.reset()
    return fraction, measured
