"""What the step bench prints: the table of variants and one profiled step."""

from __future__ import annotations

import math

import torch

from tunesmith.bench.hardware import describe_device, sync
from tunesmith.bench.spec import BenchOptions, Result


def profile_step(device: torch.device, name: str, run, batch, step_ms: float) -> tuple[str, float]:
    """One profiled step: top kernels by device time, top host-side ops, and the fraction of the (median,
    un-profiled) step the device was busy. Returns the text and that fraction (0 on CPU)."""
    from torch.profiler import ProfilerActivity, profile

    on_cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=acts) as prof:
        run(batch)
        sync(device)
    events = prof.key_averages()
    device_key = "self_device_time_total"
    if on_cuda and len(events) and not hasattr(events[0], device_key):
        device_key = "self_cuda_time_total"  # older torch
    busy = 0.0
    head = f"--- profile: {name} (one step) ---"
    parts = []
    if on_cuda:
        from torch.autograd import DeviceType

        # kernel time, as the profiler's own "Self CUDA time total" counts it (device events only)
        device_us = sum(getattr(e, device_key, 0) or 0 for e in events
                        if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False))
        busy = device_us / 1000 / step_ms if step_ms > 0 else 0.0
        head += (f"\nkernels {device_us / 1000:.0f} ms in a {step_ms:.0f} ms step: GPU busy {100 * busy:.0f}%"
                 + (" (host-bound: launch / Python overhead)" if busy < 0.8 else ""))
        parts += ["top kernels by device time:", _table(events, device_key, 12)]
    parts += ["top ops by host time:", _table(events, "self_cpu_time_total", 10)]
    return "\n".join([head, *parts]), busy


def _table(events, sort_by: str, rows: int) -> str:
    try:
        return events.table(sort_by=sort_by, row_limit=rows, max_name_column_width=60)
    except Exception:  # noqa: BLE001 - column names differ across torch versions
        return events.table(sort_by="self_cpu_time_total", row_limit=rows)


def format_table(results: list[Result], o: BenchOptions, device: torch.device, peak_flops: float) -> str:
    head = (f"\n== tunesmith bench: {o.model_shape} {o.method} seq {o.seq_len} on {describe_device(device)}; "
            f"matmul {peak_flops / 1e12:.2f} TFLOP/s; median of {o.steps} steps after {o.warmup} warm-up ==")
    if o.longest:
        lines = [head, f"{'variant':<32} {'longest sequence':>40}"]
        lines += [f"{r.variant:<32} {r.error or r.note:>40}" for r in results]
        return "\n".join(lines)
    cols = (f"{'variant':<26} {'tokens/s':>9} {'peak GiB':>9} {'x base':>7} {'MFU':>6} {'step ms':>8} {'spread':>7} "
            f"{'loss':>7}  note")
    lines = [head, cols, "-" * len(cols)]
    for r in results:
        if r.error or r.tokens_per_s <= 0:
            lines.append(f"{r.variant:<26} {'-':>9} {'-':>9} {'-':>7} {'-':>6} {'-':>8} {'-':>7} {'-':>7}  "
                         f"{r.error or r.note}")
            continue
        peak = f"{r.peak_gib:.2f}" if not math.isnan(r.peak_gib) else "n/a"
        ratio = f"{r.ratio:.2f}" if r.ratio else "-"
        lines.append(f"{r.variant:<26} {r.tokens_per_s:>9,.0f} {peak:>9} {ratio:>7} {r.mfu * 100:>5.1f}% "
                     f"{r.step_ms:>8.0f} {100 * r.spread:>6.0f}% {r.loss:>7.3f}  {r.note}")
    return "\n".join(lines)
