"""Fast paths for training, each behind one ``cfg.speed`` key and each exact against the plain path.

Call order (what the model / train stages do)::

    model = load_model(...)
    model = prepare_for_training(model, cfg)      # k-bit prep, peft LoRA, gradient checkpointing
    model = apply_fast_paths(model, cfg)          # this module
    ...
    loss_sum, n_tokens = model_loss_sum(model, batch, **loss_options(cfg))   # per micro-batch
    (loss_sum / tokens_in_accumulation_window).backward()

===========================  =========================================================  =================
``cfg.speed`` key            what it does                                               where
===========================  =========================================================  =================
``packed_attention``         one varlen flash-attention call per layer, packed rows     ``attention.py``
``liger_kernel`` auto/on/off liger RMSNorm + SwiGLU modules; fused linear CE in loss     ``kernels.py``
``chunked_loss``             CE in chunks, ignored targets dropped before the head      ``loss.py``
``compile`` auto/on/off      ``torch.compile`` of each decoder layer (auto: CUDA, no    here
                             DeepSpeed); boundaries come in as arguments, no breaks
``fused_lora`` (proposed)    LoRA add folded into one bf16 addmm (peft layers)          ``lora.py``
===========================  =========================================================  =================

``fused_lora`` is read with ``getattr(cfg.speed, "fused_lora", True)`` until the schema carries it.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from tunesmith.models.fast.attention import (
    PACKED_SDPA,
    apply_packed_attention,
    packed_backend,
    register_packed_attention,
)
from tunesmith.models.fast.checkpointing import set_checkpointed_layers
from tunesmith.models.fast.kernels import apply_liger_kernels, use_liger
from tunesmith.models.fast.lora import apply_fused_lora, remove_fused_lora
from tunesmith.models.fast.nf4 import apply_compiled_nf4
from tunesmith.models.fast.loss import causal_lm_loss_sum, model_loss_sum, split_decoder_and_head

__all__ = [
    "PACKED_SDPA",
    "apply_fast_paths",
    "apply_fused_lora",
    "apply_liger_kernels",
    "apply_packed_attention",
    "causal_lm_loss_sum",
    "compile_decoder_layers",
    "compile_wanted",
    "eager_only",
    "loss_options",
    "model_loss_sum",
    "packed_backend",
    "register_packed_attention",
    "remove_fused_lora",
    "set_checkpointed_layers",
    "split_decoder_and_head",
]


def _speed(cfg: Any) -> Any:
    return getattr(cfg, "speed", cfg)


def compile_decoder_layers(model: nn.Module) -> int:
    """``torch.compile`` every decoder layer in place (one compiled graph reused across identical layers)."""
    from tunesmith.models.fast.checkpointing import decoder_layers

    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)


def compile_wanted(cfg: Any, deepspeed_stage: int = 0, device: torch.device | None = None) -> bool:
    """Resolve ``speed.compile``: ``auto`` compiles on a CUDA GPU (``device``, default: whether one exists) when
    DeepSpeed does not wrap the model (its ZeRO hooks gather and release parameters around each layer) and the
    data is packed (rows of one length: one compiled graph; unpacked rows of ever-changing lengths recompiled the
    layers five times in eight steps on an H200, slower than eager for short runs); ``on`` / ``off`` (or a bool)
    as given."""
    mode = getattr(_speed(cfg), "compile", "off")
    if isinstance(mode, bool):
        mode = "on" if mode else "off"
    if mode == "auto":
        packed = getattr(getattr(cfg, "data", None), "pack_to_max_length", True)
        on_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
        return on_cuda and deepspeed_stage == 0 and packed
    return mode == "on"


@contextlib.contextmanager
def eager_only():
    """Run compiled layers eagerly inside the block (generation and evaluation during training: new shapes and
    no-grad graphs would each cost a compilation for a few calls)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:
        yield
        return
    with set_stance("force_eager"):
        yield


def apply_fast_paths(model: nn.Module, cfg: Any, *, deepspeed_stage: int = 0) -> nn.Module:
    """Apply every fast path ``cfg.speed`` switches on; returns the same model (modules swapped in place).

    ``cfg`` is a ``TrainConfig`` (or its ``speed`` section). Call after LoRA / k-bit preparation. What was
    applied is recorded in ``model.tunesmith_fast_paths`` for the logs.
    """
    speed = _speed(cfg)
    applied: dict[str, Any] = {}
    if getattr(speed, "packed_attention", True):
        apply_packed_attention(model, True)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        applied["attention"] = getattr(base.config, "_attn_implementation", None)
    first = next(model.parameters(), None)
    compiled = compile_wanted(cfg, deepspeed_stage, first.device if first is not None else None)
    liger_mode = getattr(speed, "liger_kernel", "auto")
    # compiled layers get RMSNorm and SwiGLU fused by the compiler; liger's modules stay out of those graphs
    # unless asked for by name (its fused cross-entropy in the loss is outside the layers and stays on)
    applied["liger"] = apply_liger_kernels(model, "off" if compiled and liger_mode == "auto" else liger_mode)
    if getattr(speed, "fused_lora", True):
        applied["fused_lora_layers"] = apply_fused_lora(model)
    if compiled:
        applied["compiled_nf4_linears"] = apply_compiled_nf4(model)  # 4-bit weights dequantized inside the graphs
        applied["compiled_layers"] = compile_decoder_layers(model)
    applied["loss"] = loss_options(cfg)
    try:
        model.tunesmith_fast_paths = applied
    except Exception:  # a module that refuses new attributes: the record is optional
        pass
    return model


def loss_options(cfg: Any) -> dict[str, Any]:
    """Keyword arguments for :func:`model_loss_sum` from ``cfg.speed``: ``chunked`` and ``use_liger``."""
    speed = _speed(cfg)
    chunked = bool(getattr(speed, "chunked_loss", True))
    liger = chunked and use_liger(getattr(speed, "liger_kernel", "auto"))
    return {"chunked": chunked, "use_liger": liger}
