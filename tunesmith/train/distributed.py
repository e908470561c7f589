"""Distributed setup: torchrun's environment, the process group, DDP, and DeepSpeed ZeRO.

- Single process (no WORLD_SIZE or WORLD_SIZE=1, no --deepspeed): nothing is initialised.
- WORLD_SIZE>1 without --deepspeed: plain DDP (nccl on CUDA, gloo on CPU).
- --deepspeed NAME|FILE.json: one of the five shipped configs (`deepspeed_configs/*.json`, XTuner's) or a
  user file; XTuner's "auto" fields are filled from our config (micro-batch, accumulation, clipping,
  fp16/bf16). DeepSpeed runs single-process too (gloo on CPU), which is how the tests exercise it.

No communication code of our own: barriers, all-reduce and gathers are torch.distributed's.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunesmith.errors import TunesmithError, unknown_name_error

CONFIG_DIR = Path(__file__).parent / "deepspeed_configs"
DEEPSPEED_NAMES = ("deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero2_offload", "deepspeed_zero3",
                   "deepspeed_zero3_offload")


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized()


def setup_distributed(*, deepspeed: bool, timeout_minutes: float = 30.0) -> DistEnv:
    """Read torchrun's variables, pick the device, start the process group when needed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    env = DistEnv(rank=rank, local_rank=local_rank, world_size=world, device=device)
    if (world > 1 or deepspeed) and not env.initialized:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=max(timeout_minutes, 1.0))
        if deepspeed:
            import deepspeed as ds

            ds.init_distributed(dist_backend=backend, timeout=timeout)
        else:
            torch.distributed.init_process_group(backend=backend, timeout=timeout,
                                                 device_id=device if device.type == "cuda" else None)
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def teardown_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def rank0_first(env: DistEnv, fn, *, timeout_minutes: float, what: str = "the training data"):
    """Run `fn` on rank 0, then on the other ranks (who then hit rank 0's cache) -- with a timeout.

    The other ranks wait at a gloo barrier that fails after `timeout_minutes` with a clear message
    instead of hanging until NCCL's watchdog fires (XTuner issue #768).
    """
    if not env.initialized or env.world_size == 1:
        return fn()
    group = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    result = fn() if env.is_main else None
    try:
        torch.distributed.monitored_barrier(group=group, timeout=datetime.timedelta(minutes=timeout_minutes),
                                            wait_all_ranks=True)
    except RuntimeError as exc:
        raise TunesmithError(
            f"rank {env.rank} waited {timeout_minutes:g} minutes for rank 0 to prepare {what}",
            "raise distributed.dataset_timeout_minutes, or tokenize once beforehand on one process "
            "(the cache is reused), and check rank 0's log for an error",
        ) from exc
    return result if env.is_main else fn()


def gather_to_main(obj: Any, env: DistEnv) -> list[Any] | None:
    """Every rank's `obj` on rank 0 (a list by rank), None elsewhere."""
    if not env.initialized or env.world_size == 1:
        return [obj]
    out: list[Any] | None = [None] * env.world_size if env.is_main else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


# ----------------------------------------------------------------------------------------- DeepSpeed
def deepspeed_config_path(name_or_file: str) -> Path:
    if name_or_file in DEEPSPEED_NAMES:
        return CONFIG_DIR / f"{name_or_file}.json"
    path = Path(name_or_file)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise TunesmithError(f"DeepSpeed config {path} does not exist",
                                 f"use one of {', '.join(DEEPSPEED_NAMES)} or a JSON file")
        return path
    raise unknown_name_error("DeepSpeed config", name_or_file, DEEPSPEED_NAMES)


def resolve_deepspeed_config(name_or_file: str, cfg: Any, *, world_size: int, precision: str) -> dict[str, Any]:
    """Load a DeepSpeed JSON and fill its "auto" fields from our config. Our config wins over conflicting
    explicit values (as XTuner); the DeepSpeed-only keys (ZeRO stage, offload, ...) come from the file."""
    path = deepspeed_config_path(name_or_file)
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise TunesmithError(f"DeepSpeed config {path} is not valid JSON: {exc}") from exc
    t = cfg.training
    ds["train_micro_batch_size_per_gpu"] = t.batch_size
    ds["gradient_accumulation_steps"] = t.accumulative_counts
    ds["train_batch_size"] = t.batch_size * t.accumulative_counts * world_size
    ds["gradient_clipping"] = float(t.max_norm) if t.max_norm is not None else 0.0
    ds.setdefault("fp16", {})["enabled"] = precision == "fp16"
    ds.setdefault("bf16", {})["enabled"] = precision == "bf16"
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds["steps_per_print"] = ds.get("steps_per_print", 10**9)  # our logger prints, not DeepSpeed's
    ds["wall_clock_breakdown"] = False
    if not torch.cuda.is_available():
        for key in ("offload_optimizer", "offload_param"):
            section = ds.get("zero_optimization", {}).get(key)
            if isinstance(section, dict):
                section["pin_memory"] = False  # nothing to pin for on a CPU-only machine
    return ds


def zero_stage(ds_config: dict[str, Any] | None) -> int:
    if not ds_config:
        return 0
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def gathered_parameters(params: list[torch.nn.Parameter], stage: int):
    """Context that materialises ZeRO-3 partitioned parameters on every rank (a no-op below stage 3)."""
    import contextlib

    if stage < 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
