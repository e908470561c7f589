"""Fast paths for training, each behind one ``speed`` key and each exact against the plain path.

Call order (what the train stage does)::

    model = load_model(...)
    model = prepare_for_training(model, cfg)      # k-bit prep, peft LoRA, gradient checkpointing
    model.to(device)
    fast = apply_fast_paths(model, cfg.speed, packed=..., deepspeed_stage=..., device=device)
    loss_sum, n_tokens = model_loss_sum(model, batch, **fast.loss_options())   # per micro-batch

``plan_fast_paths`` decides from the config and the device the model will train on (passed in, never guessed
from where the weights happen to be); ``apply_fast_paths`` does what it decided and returns the decision with
the counts as a :class:`FastPaths` record, which the loop keeps, prints in one line and writes to
``environment.json``.

===========================  =========================================================  =================
``speed`` key                what it does                                               where
===========================  =========================================================  =================
``packed_attention``         one varlen flash-attention call per layer, packed rows     ``attention.py``,
                             (and pair rows holding a shared prompt once)               ``varlen.py``,
                                                                                        ``shared_prompt.py``
``liger_kernel`` auto/on/off liger RMSNorm + SwiGLU modules; fused linear CE in loss     ``kernels.py``
``chunked_loss``             CE in chunks, ignored targets dropped before the head      ``loss.py``
``compile`` auto/on/off      ``torch.compile`` of each decoder layer (auto: see         here
                             :func:`compile_wanted`)
``fused_lora``               LoRA add folded into one addmm in the activation dtype     ``lora.py``
``embeddings_on_host``       frozen input embedding looked up on the CPU (memory)       ``host_embedding.py``
===========================  =========================================================  =================
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from tunesmith.models.fast.attention import (
    PACKED_SDPA,
    apply_packed_attention,
    packed_backend,
    register_packed_attention,
)
from tunesmith.models.fast.checkpointing import decoder_layers, set_checkpointed_layers
from tunesmith.models.fast.host_embedding import move_embeddings_to_host
from tunesmith.models.fast.kernels import apply_liger_kernels, liger_unavailable_reason
from tunesmith.models.fast.lora import apply_fused_lora, remove_fused_lora
from tunesmith.models.fast.loss import (
    causal_lm_loss_sum,
    model_loss_sum,
    split_decoder_and_head,
)
from tunesmith.models.fast.nf4 import apply_compiled_nf4

__all__ = [
    "PACKED_SDPA",
    "FastPaths",
    "apply_fast_paths",
    "apply_fused_lora",
    "apply_liger_kernels",
    "apply_packed_attention",
    "causal_lm_loss_sum",
    "compile_decoder_layers",
    "compile_wanted",
    "eager_only",
    "model_loss_sum",
    "packed_backend",
    "plan_fast_paths",
    "register_packed_attention",
    "remove_fused_lora",
    "set_checkpointed_layers",
    "split_decoder_and_head",
]


@dataclass(frozen=True)
class FastPaths:
    """The fast paths one model trains with: what :func:`plan_fast_paths` decided for its device, and (after
    :func:`apply_fast_paths`) how many modules each one touched."""

    device: str
    packed_attention: bool
    compiled: bool
    compile_reason: str  # why compiled or not, for the log line
    liger_modules: bool  # liger's RMSNorm / SwiGLU module swaps
    liger_loss: bool  # liger's fused linear cross-entropy in the loss
    chunked_loss: bool
    fused_lora: bool
    embeddings_on_host: bool = False
    attention: str | None = None
    counts: dict[str, int] = field(default_factory=dict)

    def loss_options(self) -> dict[str, Any]:
        """Keyword arguments for :func:`model_loss_sum`."""
        return {"chunked": self.chunked_loss, "use_liger": self.liger_loss}

    @property
    def compiled_layers(self) -> int:
        return self.counts.get("compiled_layers", 0)

    def describe(self) -> str:
        """One line for the training log."""
        attention = self.attention or "the model's own"
        if self.packed_attention:
            attention += " (packed samples kept apart)"
        if self.compiled:
            layers = f"compiled layers {self.compiled_layers}"
            if self.counts.get("compiled_nf4_linears"):
                layers += f" (NF4 dequantized in-graph for {self.counts['compiled_nf4_linears']} linears)"
        else:
            layers = f"eager layers ({self.compile_reason})"
        liger = (f"liger norm+SwiGLU {self.counts.get('rms_norm', 0)}+{self.counts.get('swiglu', 0)}"
                 if self.liger_modules else "liger modules off")
        lora = f"fused LoRA {self.counts.get('fused_lora_layers', 0)}" if self.fused_lora else "peft LoRA forward"
        if self.liger_loss:
            loss = "liger fused linear+CE"
        elif self.chunked_loss:
            loss = "chunked CE"
        else:
            loss = "full-logits CE"
        host = "; input embedding on the host" if self.counts.get("embeddings_on_host") else ""
        return f"fast paths on {self.device}: attention {attention}; {layers}; {liger}; {lora}; loss {loss}{host}"

    def record(self) -> dict[str, Any]:
        """A JSON-able record (environment.json)."""
        return {"device": self.device, "attention": self.attention, "packed_attention": self.packed_attention,
                "compiled": self.compiled, "compile_reason": self.compile_reason,
                "liger_modules": self.liger_modules, "liger_loss": self.liger_loss,
                "chunked_loss": self.chunked_loss, "fused_lora": self.fused_lora,
                "embeddings_on_host": self.embeddings_on_host, **self.counts}

    @property
    def host_inputs(self) -> tuple[str, ...]:
        """Batch keys the training step leaves on the host (token ids for an embedding kept there)."""
        return ("input_ids",) if self.counts.get("embeddings_on_host") else ()


def compile_wanted(mode: str, *, packed: bool, deepspeed_stage: int, device: torch.device) -> tuple[bool, str]:
    """Resolve ``speed.compile`` (auto / on / off) for a model that trains on ``device``; returns the answer and
    why. ``auto`` compiles each decoder layer when

    * the device is a CUDA GPU (on the CPU the compile time is never paid back);
    * DeepSpeed, if any, is at ZeRO stage 0-2: stages 1 and 2 partition optimizer state and gradients, not the
      weights, so the layers see whole parameters; ZeRO-3 gathers and releases weights in hooks around every
      module, which a compiled graph would bypass;
    * the data is packed: rows of one length give one graph, while unpacked rows of ever-changing lengths
      recompiled the layers five times in eight steps on an H200 (slower than eager for short runs).
    """
    if mode == "off":
        return False, "speed.compile off"
    if mode == "on":
        return True, "speed.compile on"
    if device.type != "cuda":
        return False, f"compile auto: not on a CUDA GPU ({device.type})"
    if deepspeed_stage >= 3:
        return False, "compile auto: ZeRO-3 partitions the weights"
    if not packed:
        return False, "compile auto: unpacked rows change shape every step"
    return True, "compile auto"


def plan_fast_paths(speed: Any, *, packed: bool, deepspeed_stage: int, device: torch.device | str,
                    world_size: int = 1) -> FastPaths:
    """Decide every fast path for a model that trains on ``device`` (a pure function of its arguments and of
    what is installed; nothing is touched). ``speed`` is the config's ``SpeedSection``."""
    device = torch.device(device)
    compiled, reason = compile_wanted(speed.compile, packed=packed, deepspeed_stage=deepspeed_stage, device=device)
    liger_here = device.type == "cuda" and liger_unavailable_reason() is None
    mode = speed.liger_kernel
    if mode == "on" and not liger_here:
        from tunesmith.errors import TunesmithError

        why = liger_unavailable_reason() or f"the model trains on {device.type}"
        raise TunesmithError(f"speed.liger_kernel is 'on' but {why}",
                             "pip install 'tunesmith[gpu]' on a CUDA machine, or set speed.liger_kernel auto / off")
    # compiled layers get RMSNorm and SwiGLU fused by the compiler: liger's modules stay out of those graphs unless
    # asked for by name; its fused cross-entropy in the loss is outside the layers and stays on
    liger_modules = mode == "on" or (mode == "auto" and liger_here and not compiled)
    return FastPaths(
        device=device.type,
        packed_attention=bool(speed.packed_attention),
        compiled=compiled,
        compile_reason=reason,
        liger_modules=liger_modules,
        liger_loss=bool(speed.chunked_loss) and mode != "off" and liger_here,
        chunked_loss=bool(speed.chunked_loss),
        # the fused forward reads lora_A / lora_B outside their own forward, where ZeRO-3 has not gathered them
        fused_lora=bool(speed.fused_lora) and deepspeed_stage < 3,
        # DDP and DeepSpeed move every parameter to the device
        embeddings_on_host=bool(speed.embeddings_on_host) and device.type == "cuda" and deepspeed_stage == 0
        and world_size == 1,
    )


def compile_decoder_layers(model: nn.Module) -> int:
    """``torch.compile`` every decoder layer in place (one compiled graph reused across identical layers)."""
    # transformers >= 5.25 wraps attention forwards (the `kernels` hub's use_kernelized_func) in a set / reset of a
    # module-level variable; inside a checkpointed layer dynamo would break the graph there rather than replay that
    # side effect in the recompute. Set and reset leave nothing behind, so the recompute need not replay them.
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)


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


def apply_fast_paths(model: nn.Module, speed: Any, *, packed: bool, deepspeed_stage: int,
                     device: torch.device | str, world_size: int = 1) -> FastPaths:
    """Apply what :func:`plan_fast_paths` decides (modules swapped in place) and return the record with counts.
    Call after LoRA / k-bit preparation, with the model on ``device``."""
    plan = plan_fast_paths(speed, packed=packed, deepspeed_stage=deepspeed_stage, device=device,
                           world_size=world_size)
    counts: dict[str, int] = {}
    attention = None
    if plan.packed_attention:
        apply_packed_attention(model, True)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is not None:
        attention = getattr(config, "_attn_implementation", None)
    if plan.liger_modules:
        counts.update(apply_liger_kernels(model, "on"))
    if plan.fused_lora:
        counts["fused_lora_layers"] = apply_fused_lora(model)
    if plan.compiled:
        counts["compiled_nf4_linears"] = apply_compiled_nf4(model)  # 4-bit weights dequantized inside the graphs
        counts["compiled_layers"] = compile_decoder_layers(model)
    if plan.embeddings_on_host:
        counts["embeddings_on_host"] = int(move_embeddings_to_host(model, torch.device(device)))
        if counts["embeddings_on_host"]:
            torch.cuda.empty_cache()
    return replace(plan, attention=attention, counts=counts)
