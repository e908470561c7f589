"""NF4 weights dequantized by plain torch ops inside compiled decoder layers (QLoRA with ``speed.compile``).

bitsandbytes' ``Linear4bit`` runs each frozen 4-bit matmul through its own Python autograd function and custom
ops: per linear and per pass, a dequantisation of the double-quantised block scales, a dequantisation of the
weight and a matmul, each call crossing Python. In a QLoRA step (7 linears x 32 layers, forward, recompute and
backward) that host work, not the GPU, set the step time on an H200 (GPU busy 39 %).

Inside a compiled layer the same arithmetic written as torch ops (nibble unpacking, two table lookups, two
multiplies) becomes one generated kernel per weight, launched by the compiled graph without Python in between;
the weight's gradient path (``grad_x = grad_y @ W``) recomputes it from the 4-bit bytes rather than keeping it.
The numbers are bitsandbytes' own: the NF4 table and the 8-bit table of the block scales are read from the
weight's ``quant_state``, products in fp32, one rounding to the weight's dtype at the end.

Used only for compiled layers: eagerly, autograd would keep every dequantised weight for backward.
Exactness against ``bitsandbytes.functional.dequantize_4bit`` and ``Linear4bit.forward``:
tests/models/fast/test_compile.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_FAST_CLASSES: dict[type, type] = {}


def block_scales(state) -> torch.Tensor:
    """fp32 scale of every block of ``state`` (undoing the 8-bit double quantisation when ``state.nested``)."""
    absmax = state.absmax
    if not state.nested:
        return absmax.float()
    inner = state.state2
    block = torch.arange(absmax.numel(), device=absmax.device) // inner.blocksize
    scales = inner.code.float()[absmax.long()] * inner.absmax.float()[block]
    return scales + state.offset


def dequantize_nf4(packed: torch.Tensor, state) -> torch.Tensor:
    """The ``state.shape`` weight in ``state.dtype`` from bitsandbytes' packed 4-bit bytes (two values per byte,
    the first in the high nibble) and its ``quant_state``."""
    n = math.prod(state.shape)
    data = packed.reshape(-1)
    if data.dtype != torch.uint8:  # a non-uint8 quant_storage holds the same bytes
        data = data.view(torch.uint8)
    nibbles = torch.stack([data >> 4, data & 0x0F], dim=1).reshape(-1)[:n].long()
    block = torch.arange(n, device=data.device) // state.blocksize
    values = state.code.float()[nibbles] * block_scales(state)[block]
    return values.reshape(state.shape).to(state.dtype)


def _compiled_nf4_forward(self, x: torch.Tensor) -> torch.Tensor:
    state = getattr(self.weight, "quant_state", None)
    if state is None or state.quant_type != "nf4" or not torch.compiler.is_compiling():
        return super(type(self), self).forward(x)
    dtype = x.dtype
    if self.compute_dtype is not None:
        x = x.to(self.compute_dtype)
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return F.linear(x, dequantize_nf4(self.weight, state).to(x.dtype), bias).to(dtype)


def apply_compiled_nf4(model: nn.Module) -> int:
    """Give every bitsandbytes ``Linear4bit`` the torch-op forward for compiled graphs. Returns how many."""
    count = 0
    for module in model.modules():
        cls = type(module)
        if cls.__name__ != "Linear4bit" or cls in _FAST_CLASSES.values():
            continue
        fast = _FAST_CLASSES.get(cls)
        if fast is None:
            fast = type("CompiledNF4Linear4bit", (cls,), {"forward": _compiled_nf4_forward, "__module__": __name__})
            _FAST_CLASSES[cls] = fast
        module.__class__ = fast
        count += 1
    return count
