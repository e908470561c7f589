"""What a training checkpoint holds of a run, and how a run is put back: trainable weights, optimizer state,
schedule, grad scaler, RNG and data position (the folder format itself is checkpoint.py's)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunesmith.config import TrainConfig
from tunesmith.errors import TunesmithError
from tunesmith.train import checkpoint as ckpt
from tunesmith.train.distributed import DistEnv, gather_to_main, gathered_parameters


@dataclass
class Position:
    """Where the run is: optimizer steps taken, epochs completed, samples of this epoch already seen; and the
    lowest validation loss so far with its step (training.save_best's best.pth), None before any."""

    step: int = 0
    epoch: int = 0
    samples_in_epoch: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def is_adapter_run(model: torch.nn.Module, method: str) -> bool:
    return is_peft(model) and method != "full"


def adapter_config_dict(model: torch.nn.Module) -> dict[str, Any]:
    config = model.peft_config["default"].to_dict()
    out = {}
    for key, value in config.items():
        out[key] = sorted(value) if isinstance(value, set) else value
    return json.loads(json.dumps(out, default=str))


def trainable_weights(model: torch.nn.Module, method: str, stage: int) -> dict[str, torch.Tensor]:
    """What goes into the checkpoint (all ranks must call this under ZeRO-3; gathered to full tensors)."""
    if is_adapter_run(model, method):
        from peft import get_peft_model_state_dict

        params = [p for p in model.parameters() if p.requires_grad]
        with gathered_parameters(params, stage):
            state = get_peft_model_state_dict(model)
            return {k: v.detach().cpu().clone() for k, v in state.items()}
    with gathered_parameters(list(model.parameters()), stage):
        state = model.state_dict()
        out, seen = {}, set()
        for k, v in state.items():
            ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
            if ptr in seen:  # tied weights (lm_head = embed_tokens): stored once, re-tied at load
                continue
            seen.add(ptr)
            out[k] = v.detach().cpu().clone()
        return out


def load_trainable_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], method: str) -> None:
    if is_adapter_run(model, method):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, weights)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise TunesmithError(f"checkpoint adapter has keys this model lacks: {unexpected[:3]}")
        return
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise TunesmithError(f"checkpoint weights do not match the model (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})", "resume with the config the checkpoint was made with")
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def save_run(path: Path, *, cfg: TrainConfig, model: torch.nn.Module, backend: Any, schedule: Any,
             position: Position, env: DistEnv, config_yaml: str, config_hash: str, precision: str,
             stage: int) -> None:
    """Write the run's checkpoint folder (every rank calls this; rank 0 writes)."""
    weights = trainable_weights(model, cfg.method, stage)
    opt_tensors, opt_rest = ckpt.flatten_optimizer_state(backend.optimizer_state())
    sharded = backend.sharded_optimizer
    per_rank = gather_to_main({"rng": ckpt.rng_state(), "opt": (opt_tensors, opt_rest) if sharded else None}, env)
    if not env.is_main:
        return
    trainer_state = {
        "step": position.step, "epoch": position.epoch, "samples_in_epoch": position.samples_in_epoch,
        "best_val_loss": position.best_val_loss, "best_step": position.best_step,
        "world_size": env.world_size, "schedule": schedule.state_dict(), "rng": [r["rng"] for r in per_rank],
        "optimizer": [r["opt"][1] for r in per_rank] if sharded else [opt_rest],
        **backend.extra_state(),
    }
    meta = {"method": cfg.method, "epoch": position.epoch, "step": position.step, "config_hash": config_hash,
            "base_model": cfg.model.path, "seed": cfg.training.seed, "world_size": env.world_size,
            "deepspeed": cfg.distributed.deepspeed, "zero_stage": stage, "precision": precision,
            "data_position": {"epoch": position.epoch, "samples_in_epoch": position.samples_in_epoch},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    adapter = is_adapter_run(model, cfg.method)
    ckpt.save_checkpoint(
        path, meta=meta, config_yaml=config_yaml, weights=weights,
        weights_file="adapter_model.safetensors" if adapter else "model.safetensors",
        adapter_config=adapter_config_dict(model) if adapter else None,
        optimizer_tensors=[r["opt"][0] for r in per_rank] if sharded else [opt_tensors],
        trainer_state=trainer_state)


def restore_run(resumed: dict[str, Any], path: Path, *, backend: Any, schedule: Any, env: DistEnv) -> Position:
    """Put the optimizer, schedule and grad scaler back from a loaded checkpoint; returns the data position.
    (Weights go back before the optimizer exists, RNG states right before the first step.)"""
    state = resumed["trainer_state"]
    if state.get("world_size", 1) != env.world_size:
        raise TunesmithError(f"checkpoint {path} was written by {state.get('world_size')} processes, "
                             f"this run has {env.world_size}", "resume with the same number of GPUs")
    opt_rest = state["optimizer"][min(env.rank, len(state["optimizer"]) - 1)]
    backend.load_optimizer_state(ckpt.unflatten_optimizer_state(resumed["optimizer_tensors"], opt_rest))
    schedule.load_state_dict(state["schedule"])
    backend.load_extra_state(state)
    return Position(state["step"], state["epoch"], state["samples_in_epoch"], state.get("best_val_loss"),
                    state.get("best_step"))


def restore_rng(resumed: dict[str, Any], env: DistEnv) -> None:
    rng = resumed["trainer_state"]["rng"]
    ckpt.set_rng_state(rng[min(env.rank, len(rng) - 1)])
