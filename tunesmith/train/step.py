"""One optimizer step: the object `tunesmith train` runs and `tunesmith bench` times.

A step takes one accumulation *window* of micro-batches. Their target tokens are counted first (all ranks), each
micro-batch's loss *sum* is divided by that count, so the step's gradient is the token-weighted mean (loss.py);
then clipping, the optimizer, and the gradients are cleared. What differs between one process, DDP and DeepSpeed
lives in a small backend:

================  ================================================================================================
backend           what it adds
================  ================================================================================================
``Local``         autocast for mixed precision, a GradScaler for fp16, clipping, the optimizer
``DDP``           ``Local`` around a DistributedDataParallel wrapper: gradients synchronised at the last micro-batch
``DeepSpeed``     the engine: its own mixed precision, clipping, ZeRO partitions and optimizer step
================  ================================================================================================
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from tunesmith.train.loss import loss_scale_for, scaled_micro_loss, window_tokens


def autocast_for(precision: str, device: torch.device):
    """bf16 / fp16 autocast on CUDA; nothing in fp32 (the CPU trains in fp32)."""
    if precision == "fp32" or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def to_device(batch: dict[str, Any], device: torch.device, host_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """The batch's tensors on ``device``, except ``host_keys`` (read on the host, e.g. by an embedding there)."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) and k not in host_keys else v)
            for k, v in batch.items()}


class LocalBackend:
    """One process: autocast, a GradScaler for fp16, clipping and the optimizer step."""

    name = "single process"
    sharded_optimizer = False  # every rank holds the whole optimizer state

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                 *, precision: str, device: torch.device, max_norm: float | None):
        self.module = self.runner = module
        self.optimizer = optimizer
        self.params = params
        self.precision, self.device, self.max_norm = precision, device, max_norm
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" and device.type == "cuda" else None
        self.loss_scale = 1.0

    def sync(self, last: bool):
        return contextlib.nullcontext()

    def begin_micro(self, last: bool) -> None:
        pass

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast_for(self.precision, self.device):
            return self.runner(batch)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def end_micro(self) -> None:
        pass

    def update(self) -> float | None:
        """Clip, step the optimizer, clear the gradients; returns the gradient norm before clipping."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm if self.max_norm else float("inf"))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def optimizer_state(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def extra_state(self) -> dict[str, Any]:
        return {"grad_scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])


class DDPBackend(LocalBackend):
    """``Local`` with DistributedDataParallel: gradients are all-reduced once, at the window's last micro-batch."""

    name = "DDP"

    def __init__(self, module, optimizer, params, *, precision, device, max_norm, world_size: int):
        super().__init__(module, optimizer, params, precision=precision, device=device, max_norm=max_norm)
        self.runner = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None)
        self.loss_scale = loss_scale_for(world_size)  # DDP averages over ranks: undo it (token weighting)

    def sync(self, last: bool):
        return contextlib.nullcontext() if last else self.runner.no_sync()


class DeepSpeedBackend:
    """The DeepSpeed engine: its own mixed precision, clipping (from the config it was given), ZeRO partitions and
    optimizer step; the step is taken at the accumulation boundary."""

    sharded_optimizer = False

    def __init__(self, module, optimizer, params, *, ds_config: dict[str, Any], stage: int, world_size: int,
                 accumulation: int):
        import deepspeed

        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config,
                                                    model_parameters=params)
        self.module, self.runner = module, self.engine
        self.optimizer = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        self.name = f"DeepSpeed ZeRO-{stage}"
        self.sharded_optimizer = stage >= 1 and world_size > 1
        # DeepSpeed averages over ranks and divides by the accumulation steps: undo both (token weighting)
        self.loss_scale = loss_scale_for(world_size, accumulation)

    def sync(self, last: bool):
        return contextlib.nullcontext()

    def begin_micro(self, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.engine(batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def end_micro(self) -> None:
        self.engine.step()  # steps the optimizer only at the accumulation boundary

    def update(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else None

    def _flat_partitions(self):
        """ZeRO-3 keys the optimizer state by its flat fp32 partitions, which are not in the param groups."""
        return getattr(getattr(self.engine, "optimizer", None), "fp32_partitioned_groups_flat", None)

    def optimizer_state(self) -> dict[str, Any]:
        flat = self._flat_partitions()
        if flat is None:
            return self.optimizer.state_dict()
        state = {i: dict(self.optimizer.state[p]) for i, p in enumerate(flat) if p in self.optimizer.state}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": []} for g in self.optimizer.param_groups]
        return {"state": state, "param_groups": groups}

    def load_optimizer_state(self, state_dict: dict[str, Any]) -> None:
        flat = self._flat_partitions()
        if flat is None:
            self.optimizer.load_state_dict(state_dict)
            return
        for i, entry in state_dict["state"].items():
            p = flat[int(i)]
            self.optimizer.state[p] = {k: (v.to(p.device).clone() if torch.is_tensor(v) else v)
                                       for k, v in entry.items()}
        for group, saved in zip(self.optimizer.param_groups, state_dict["param_groups"], strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})

    def extra_state(self) -> dict[str, Any]:
        return {"grad_scaler": None}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass


@dataclass
class StepOutput:
    loss_sum: torch.Tensor  # summed target-token losses of the window, all ranks (preference: summed pair losses)
    tokens: torch.Tensor  # target tokens of the window, all ranks (preference: pairs)
    grad_norm: float | None
    input_tokens: int  # the throughput count: input positions this rank processed, padding included; for pairs
    # their chosen and rejected tokens in full, a shared prompt counted in both (the batch's num_tokens)
    samples: int  # rows this rank processed
    stats: dict[str, float] = field(default_factory=dict)  # preference numbers summed over the window, all ranks

    @property
    def loss(self) -> float:
        return float(self.loss_sum / self.tokens.clamp(min=1))


class TrainStep:
    """One optimizer step over a window of micro-batches, through ``backend``."""

    def __init__(self, backend: LocalBackend | DeepSpeedBackend, device: torch.device,
                 host_inputs: tuple[str, ...] = ()):
        self.backend, self.device, self.host_inputs = backend, device, host_inputs

    def __call__(self, window: list[dict[str, Any]]) -> StepOutput:
        b = self.backend
        tokens = window_tokens(window, self.device, getattr(b.module, "count_key", "num_loss_tokens"))
        total = torch.zeros((), device=self.device)
        input_tokens = samples = 0
        for i, batch in enumerate(window):
            last = i == len(window) - 1
            batch = to_device(batch, self.device, self.host_inputs)
            input_tokens += int(batch.get("num_tokens", batch["input_ids"].numel()))
            samples += int(batch["input_ids"].shape[0])
            b.begin_micro(last)
            with b.sync(last):
                loss_sum, _ = b.forward(batch)
                b.backward(scaled_micro_loss(loss_sum.float(), tokens, b.loss_scale))
            total += loss_sum.detach().float()
            b.end_micro()
        grad_norm = b.update()
        stats = take_stats(b.module)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
        return StepOutput(total, tokens, grad_norm, input_tokens, samples, stats)


def take_stats(module: torch.nn.Module) -> dict[str, float]:
    """The numbers a preference module summed since it was last asked, added over all ranks ({} for SFT)."""
    take = getattr(module, "take_stats", None)
    stats = take() if take is not None else {}
    if not stats:
        return {}
    keys = sorted(stats)
    values = torch.stack([stats[k].to(torch.float64) for k in keys])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(values)
    return dict(zip(keys, values.tolist(), strict=True))


def probe_step(module: torch.nn.Module, precision: str, device: torch.device):
    """Forward + backward of one micro-batch through the bare (unwrapped) module with the step's precision, no
    optimizer: what the activation planner measures before any wrapper exists."""

    def forward_backward(batch: dict[str, Any]) -> None:
        with autocast_for(precision, device):
            loss_sum, _ = module(to_device(batch, device))
        loss_sum.float().backward()

    return forward_backward
