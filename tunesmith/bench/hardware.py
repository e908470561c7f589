"""The device a benchmark runs on: picking it, its matmul rate, synchronising, freeing and reading memory."""

from __future__ import annotations

import gc
import os
import time

import torch

GiB = 1024**3


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def measure_matmul_flops(device: torch.device) -> float:
    """The card's dense matmul rate on random data (bf16 on CUDA, fp32 on CPU), FLOP/s."""
    if device.type == "cuda":
        n, dtype, reps = 8192, torch.bfloat16, 10
    else:
        n, dtype, reps = 512, torch.float32, 5
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    dt = (time.perf_counter() - t0) / reps
    del a, b
    return 2 * n**3 / dt


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GiB
    return float("nan")


def card_gib(device: torch.device) -> float:
    return torch.cuda.get_device_properties(device).total_memory / GiB if device.type == "cuda" else float("nan")


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / GiB:.0f} GiB), torch {torch.__version__}"
    return f"cpu ({os.cpu_count()} cores), torch {torch.__version__}"
