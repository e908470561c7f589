"""liger-kernel's Triton kernels on Llama / Qwen2 / Mistral / InternLM(2)-family models, by module swap.

What is swapped (explicitly, module by module; nothing in transformers is patched):

* every ``*RMSNorm`` module (HF's ``weight * (x * rsqrt(mean(x^2) + eps))`` form, attribute
  ``variance_epsilon``) becomes a :class:`liger_kernel.transformers.LigerRMSNorm` in ``llama`` casting mode that
  *shares* the original weight parameter (state-dict keys unchanged);
* every SwiGLU MLP (children ``gate_proj``, ``up_proj``, ``down_proj`` and a SiLU ``act_fn``) becomes a
  :class:`LigerSwiGLU` that keeps those three children as they are (plain, LoRA-wrapped or 4-bit) and fuses
  only ``silu(gate) * up`` with liger's ``LigerSiLUMulFunction``.

Not swapped: RoPE. liger's ``liger_rotary_pos_emb`` can only be installed by replacing the module-level
``apply_rotary_pos_emb`` function of a transformers modeling file (what its ``apply_liger_kernel_to_llama``
does), which changes every model in the process; DESIGN principle 3 rules that out. Its gain is a few
elementwise passes per layer. The fused linear cross-entropy is used by the loss (``fast/loss.py``).

``speed.liger_kernel``: ``auto`` applies it on CUDA when liger-kernel (>= 0.5) imports and silently does
nothing otherwise; ``on`` raises :class:`TunesmithError` when it cannot run; ``off`` never touches the model.
"""

from __future__ import annotations

import torch
from torch import nn

from tunesmith.errors import TunesmithError

MIN_LIGER_VERSION = (0, 5, 0)


def liger_version() -> tuple[int, ...] | None:
    from importlib.metadata import PackageNotFoundError, version

    text = None
    for name in ("liger-kernel", "liger_kernel"):
        try:
            text = version(name)
            break
        except PackageNotFoundError:
            continue
    if text is None:
        return None
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def liger_unavailable_reason() -> str | None:
    """Why liger cannot run here, or ``None`` when it can."""
    if not torch.cuda.is_available():
        return "liger-kernel needs a CUDA GPU"
    ver = liger_version()
    if ver is None:
        import importlib.util

        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel is not installed"
        # importable without package metadata (copied in, say): the imports below decide
    elif ver < MIN_LIGER_VERSION:
        return f"liger-kernel {'.'.join(map(str, ver))} is older than {'.'.join(map(str, MIN_LIGER_VERSION))}"
    try:
        from liger_kernel.ops import LigerSiLUMulFunction  # noqa: F401
        from liger_kernel.transformers import LigerRMSNorm  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - triton missing or broken
        return f"liger-kernel does not import ({type(exc).__name__}: {exc})"
    return None


def use_liger(mode: str) -> bool:
    """Resolve ``speed.liger_kernel`` (auto / on / off) to a yes or no; ``on`` without liger is a user error."""
    if mode == "off":
        return False
    reason = liger_unavailable_reason()
    if reason is None:
        return True
    if mode == "on":
        raise TunesmithError(
            f"speed.liger_kernel is 'on' but {reason}",
            hint="pip install 'tunesmith[gpu]' on a CUDA machine, or set speed.liger_kernel auto / off",
        )
    return False


class LigerSwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with the activation and product fused; keeps the original children."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj = mlp.gate_proj
        self.up_proj = mlp.up_proj
        self.down_proj = mlp.down_proj
        for name in ("config", "hidden_size", "intermediate_size"):
            if hasattr(mlp, name):
                setattr(self, name, getattr(mlp, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from liger_kernel.ops import LigerSiLUMulFunction

        gate = self.gate_proj(x)
        up = self.up_proj(x)
        if up.dtype != gate.dtype:
            up = up.to(gate.dtype)
        return self.down_proj(LigerSiLUMulFunction.apply(gate, up))


def _is_hf_rmsnorm(module: nn.Module) -> bool:
    return (
        type(module).__name__.endswith("RMSNorm")
        and isinstance(getattr(module, "weight", None), nn.Parameter)
        and module.weight.dim() == 1
        and hasattr(module, "variance_epsilon")
        and not type(module).__name__.startswith(("Gemma", "Liger"))  # Gemma scales by (1 + w)
    )


_SILU_CLASSES = {"SiLU", "SiLUActivation"}  # torch's, and transformers' ACT2FN["silu"]


def _is_swiglu_mlp(module: nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    return (
        all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
        and type(act).__name__ in _SILU_CLASSES
        and not isinstance(module, LigerSwiGLU)
    )


def liger_swap_plan(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """``(parent, child name, "rms_norm" | "swiglu")`` for every module :func:`apply_liger_kernels` would swap.

    Norms whose weight dtype differs from the embeddings' (peft's fp32 upcast for k-bit training) are left
    alone: HF's norm returns fp32 there, liger's would not, and the plain path must stay the reference.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    act_dtype = emb.weight.dtype if emb is not None and hasattr(emb, "weight") else None
    plan = []
    for parent in base.modules():
        for name, child in parent.named_children():
            if _is_hf_rmsnorm(child):
                if act_dtype is None or child.weight.dtype == act_dtype:
                    plan.append((parent, name, "rms_norm"))
            elif _is_swiglu_mlp(child):
                plan.append((parent, name, "swiglu"))
    return plan


def apply_liger_kernels(model: nn.Module, mode: str = "auto") -> dict[str, int]:
    """Swap RMSNorm and SwiGLU MLP modules for liger's (see :func:`liger_swap_plan`); returns the counts."""
    counts = {"rms_norm": 0, "swiglu": 0}
    if not use_liger(mode):
        return counts
    from liger_kernel.transformers import LigerRMSNorm

    for parent, name, kind in liger_swap_plan(model):
        child = getattr(parent, name)
        if kind == "rms_norm":
            new = LigerRMSNorm(child.weight.shape[0], eps=child.variance_epsilon, casting_mode="llama", in_place=False)
            new.weight = child.weight  # shared parameter: same tensor, same state-dict key
        else:
            new = LigerSwiGLU(child)
        setattr(parent, name, new)
        counts[kind] += 1
    return counts
