"""What a failed run tells its user: out of memory and a loss that is no longer a number, with what to change."""

from __future__ import annotations

from tunesmith.config import TrainConfig
from tunesmith.errors import TunesmithError


def oom_error(cfg: TrainConfig, stage: int, *, planned: bool = True) -> TunesmithError:
    """`planned`: an activation plan sized this run (compiled layers), so speed.memory_fraction acts on it."""
    lower = [f"training.batch_size (now {cfg.training.batch_size}; raise accumulative_counts to keep the "
             f"effective batch)", f"data.max_length (now {cfg.data.max_length})"]
    if not cfg.training.gradient_checkpointing:
        lower.append("turn training.gradient_checkpointing on")
    elif planned:
        lower.append(f"speed.memory_fraction (now {cfg.speed.memory_fraction}: the share of the card the "
                     "activation plan fills)")
    if cfg.training.optimizer == "adamw":
        lower.append("training.optimizer=adamw_8bit (a quarter of AdamW's state)")
    if stage < 3:
        lower.append(f"a higher ZeRO stage (--deepspeed deepspeed_zero{min(stage + 1, 3) if stage else 2}"
                     f"{'' if stage else ' or deepspeed_zero3_offload'})")
    if cfg.method != "full" and cfg.quantization.bits != 4:
        lower.append("method=qlora (a 4-bit base)")
    elif cfg.method == "full":
        lower.append("method lora or qlora instead of full fine-tuning")
    return TunesmithError("CUDA out of memory during training", "lower: " + "; ".join(lower))


def nan_error(step: int, loss: float, precision: str) -> TunesmithError:
    causes = ["a learning rate too high (training.lr)", "no or a loose clipping (training.max_norm)"]
    if precision == "fp16":
        causes.insert(0, "fp16 overflow: use bf16 (training.mixed_precision=bf16) on GPUs that support it")
    causes.append("broken samples (run `tunesmith check-custom-dataset CONFIG`)")
    return TunesmithError(f"loss became {loss} at step {step}; training stopped",
                          "usual causes: " + "; ".join(causes) + ". Resume from the last good checkpoint "
                          "after fixing it")
