"""Setting a run up: precision and seeds, the model with its fast paths on the device it trains on, the data.

`prepare_model` is the one way a loaded model becomes a trainable one (LoRA / k-bit preparation, moved to the
device, fast paths decided for that device); the bench builds its random-weight models through it too.
"""

from __future__ import annotations

import math
import os
import platform
import random
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from tunesmith.config import TrainConfig
from tunesmith.errors import TunesmithError
from tunesmith.models.fast import FastPaths, apply_fast_paths
from tunesmith.progress import callback_bar
from tunesmith.train.distributed import DistEnv, rank0_first


def resolve_precision(requested: str, device: torch.device) -> str:
    """The training precision: ``requested`` ('auto': models.quantize.auto_dtype's rule) on a GPU; the CPU always
    trains in fp32 (no autocast there)."""
    from tunesmith.models.quantize import DTYPE_NAMES, pick_dtype

    if device.type != "cuda":
        return "fp32"
    return DTYPE_NAMES[pick_dtype(requested, device, what="training.mixed_precision")]


def weights_dtype(cfg: TrainConfig, precision: str, stage: int) -> str:
    """The dtype weights are loaded in: ``model.dtype``, or for ``auto`` the training precision, except full
    fine-tuning without DeepSpeed, which keeps fp32 masters and computes under autocast."""
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    return "fp32" if cfg.method == "full" and stage == 0 else precision


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        if torch.cuda.is_available():
            # the flash, memory-efficient and cuDNN attention backwards accumulate with atomics; only the math
            # kernel gives the same gradients run after run (resume-exactness on GPU needs it)
            torch.backends.cuda.enable_flash_sdp(False)
            torch.backends.cuda.enable_mem_efficient_sdp(False)
            torch.backends.cuda.enable_cudnn_sdp(False)


def memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated (GiB) on CUDA; the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def environment_info(env: DistEnv, precision: str, fast: FastPaths, activation_plan: str | None) -> dict[str, Any]:
    import transformers

    from tunesmith import __version__

    info: dict[str, Any] = {"tunesmith": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
                            "transformers": transformers.__version__, "platform": platform.platform(),
                            "world_size": env.world_size, "precision": precision, "cuda": torch.version.cuda,
                            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                            "fast_paths": fast.record(), "activation_plan": activation_plan}
    from importlib import metadata

    for name in ("peft", "bitsandbytes", "deepspeed", "accelerate", "liger-kernel"):
        try:  # the installed version without importing it (importing deepspeed / bitsandbytes is slow and noisy)
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = None
    return info


# ----------------------------------------------------------------------------------------- model
def prepare_model(model: torch.nn.Module, cfg: TrainConfig, *, device: torch.device, deepspeed_stage: int = 0,
                  world_size: int = 1) -> tuple[torch.nn.Module, FastPaths]:
    """A loaded model made trainable for ``cfg``: LoRA / k-bit preparation (models stage), moved to ``device``
    (quantized weights are placed there by the loader), then the fast paths decided for ``device``."""
    from tunesmith import models

    model = models.prepare_for_training(model, cfg)
    if cfg.quantization.bits is None:
        model.to(device)
    # a row of preference pairs always holds two sequences or more: packed attention, packed or not
    rows_packed = cfg.data.pack_to_max_length or cfg.training.objective != "sft"
    fast = apply_fast_paths(model, cfg.speed, packed=rows_packed, deepspeed_stage=deepspeed_stage,
                            device=device, world_size=world_size)
    return model, fast


def load_tokenizer(cfg: TrainConfig, model_path: Path):
    """The tokenizer of ``cfg`` (``model.tokenizer_path`` or that of the model at ``model_path``); loaded before the
    model, so the data can be read and checked before anything slow happens."""
    from tunesmith import models

    return models.load_tokenizer(cfg.model.tokenizer_path or model_path, trust_remote_code=cfg.model.trust_remote_code)


def load_model(cfg: TrainConfig, model_path: Path, env: DistEnv, precision: str, stage: int = 0):
    """The model at ``model_path`` (``cfg.model.path`` resolved) prepared to train on ``env.device``; returns
    (model, fast paths)."""
    from tunesmith import models

    q = cfg.quantization
    device_map = {"": env.device.index or 0} if q.bits is not None and env.device.type == "cuda" else None
    model = models.load_model(model_path, dtype=weights_dtype(cfg, precision, stage), bits=q.bits,
                              device_map=device_map, trust_remote_code=cfg.model.trust_remote_code,
                              attn_implementation=cfg.model.attn_implementation, quant_type=q.quant_type,
                              double_quant=q.double_quant, compute_dtype=q.compute_dtype,
                              quant_storage=q.quant_storage)
    return prepare_model(model, cfg, device=env.device, deepspeed_stage=stage, world_size=env.world_size)


# ----------------------------------------------------------------------------------------- data
@dataclass
class TrainData:
    dataset: Any
    loader_for: Callable[..., Any]  # (epoch, start_index=0) -> this rank's DataLoader
    epoch_samples: int  # this rank's samples per epoch
    total_steps: int
    validation: Any = None  # data.validation's dataset (None without)
    validation_batches: Callable[[], Any] | None = None  # () -> this rank's validation batches, the same each time


def build_data(cfg: TrainConfig, tokenizer: Any, env: DistEnv, *, progress: bool, printer: Callable[[str], None]):
    """Tokenized (cached) and packed training data, this rank's loaders, and the run's number of steps; the
    validation data of ``data.validation`` likewise. Tokenizing shows a bar with ``progress``, else a few plain
    lines through ``printer`` (rank 0)."""
    from tunesmith.data import build_train_dataset, build_validation_dataset, make_dataloader

    t = cfg.training

    def both(report):
        train_part = build_train_dataset(cfg, tokenizer, progress=report)
        return train_part, build_validation_dataset(cfg, tokenizer, progress=report)

    with callback_bar("tokenizing", enabled=env.is_main, bar=progress, printer=printer) as report:
        (dataset, stats), (val_dataset, val_stats) = rank0_first(
            env, lambda: both(report), timeout_minutes=cfg.distributed.dataset_timeout_minutes)
    if len(dataset) == 0:
        raise TunesmithError(f"no training samples in {cfg.data.path}",
                             "run `tunesmith check-custom-dataset CONFIG` to see what was dropped")
    if val_dataset is not None and len(val_dataset) == 0:
        raise TunesmithError(f"no validation samples in data.validation {cfg.data.validation}",
                             "check that file (it is read like data.path), or hold out a larger fraction")
    if env.is_main:
        printer(stats.summary())
        if val_stats is not None:
            printer(f"validation: {val_stats.conversations} conversations, {val_stats.samples} samples"
                    + (f" in {len(val_dataset)} packed sequences" if val_dataset.packed else "")
                    + f", {val_stats.loss_tokens} loss tokens")

    def loader_for(epoch: int, start_index: int = 0):
        return make_dataloader(dataset, cfg, seed=t.seed, epoch=epoch, rank=env.rank, world_size=env.world_size,
                               start_index=start_index)

    epoch_samples = len(loader_for(0).sampler)
    steps_per_epoch = math.ceil(math.ceil(epoch_samples / t.batch_size) / t.accumulative_counts)
    total_steps = t.max_steps if t.max_steps is not None else steps_per_epoch * t.max_epochs
    validation_batches = None
    if val_dataset is not None:
        def validation_batches():
            return make_dataloader(val_dataset, cfg, seed=t.seed, epoch=0, rank=env.rank, world_size=env.world_size)
    return TrainData(dataset, loader_for, epoch_samples, total_steps, val_dataset, validation_batches)
