"""liger-kernel's module swaps."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.models.fast.helpers import (
    assert_same_loss_and_grads,
    check_against_fp32,
    gpu_batch,
    gpu_models,
    lora,
    needs_cuda,
    packed_batch,
    tiny_llama,
)
from tunesmith.errors import TunesmithError
from tunesmith.models.fast import (
    apply_liger_kernels,
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour")
def test_liger_on_without_cuda_is_a_user_error():
    model = tiny_llama()
    assert apply_liger_kernels(model, "auto") == {"rms_norm": 0, "swiglu": 0}
    with pytest.raises(TunesmithError, match="liger_kernel"):
        apply_liger_kernels(model, "on")


def test_liger_swap_plan_finds_norms_and_mlps_of_a_lora_model():
    from tunesmith.models.fast.kernels import liger_swap_plan

    model = lora(tiny_llama(layers=3))
    kinds = [k for _, _, k in liger_swap_plan(model)]
    assert kinds.count("rms_norm") == 2 * 3 + 1 and kinds.count("swiglu") == 3
    # norms upcast to fp32 by k-bit preparation (embeddings bf16) are left to HF
    bf16 = tiny_llama(dtype=torch.bfloat16)
    bf16.model.norm.weight.data = bf16.model.norm.weight.data.float()
    kinds = [k for _, _, k in liger_swap_plan(bf16)]
    assert kinds.count("rms_norm") == 2 * 2 and kinds.count("swiglu") == 2


def test_liger_swap_mechanics_with_a_stand_in_liger(monkeypatch):
    """The swap itself (shared weights, LoRA children kept, same numbers), with a pure-torch stand-in for
    liger's modules so it runs on CPU; the real kernels are checked by the gpu tests."""
    import sys
    import types

    from tunesmith.models.fast import kernels

    class StandInRMSNorm(nn.Module):
        def __init__(self, hidden_size, eps=1e-6, casting_mode="llama", in_place=True):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(hidden_size))
            self.variance_epsilon = eps

        def forward(self, x):
            xf = x.float()
            rms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return self.weight * (xf * rms).to(x.dtype)

    class StandInSiLUMul(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            ctx.save_for_backward(a, b)
            return F.silu(a) * b

        @staticmethod
        def backward(ctx, g):
            a, b = ctx.saved_tensors
            s = torch.sigmoid(a)
            return g * b * (s * (1 + a * (1 - s))), g * F.silu(a)

    fake_tr = types.ModuleType("liger_kernel.transformers")
    fake_tr.LigerRMSNorm = StandInRMSNorm
    fake_ops = types.ModuleType("liger_kernel.ops")
    fake_ops.LigerSiLUMulFunction = StandInSiLUMul
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake_tr)
    monkeypatch.setitem(sys.modules, "liger_kernel.ops", fake_ops)
    monkeypatch.setattr(kernels, "use_liger", lambda mode: mode != "off")

    batch = packed_batch()
    ref = lora(tiny_llama())
    fast = copy.deepcopy(ref)
    keys = set(fast.state_dict())
    assert apply_liger_kernels(fast, "auto") == {"rms_norm": 5, "swiglu": 2}
    layer = fast.get_base_model().model.layers[0]
    assert isinstance(layer.input_layernorm, StandInRMSNorm) and isinstance(layer.mlp, kernels.LigerSwiGLU)
    assert type(layer.mlp.gate_proj).__name__ == "Linear" and hasattr(layer.mlp.gate_proj, "lora_A")
    assert set(fast.state_dict()) == keys
    assert_same_loss_and_grads(fast, ref, batch)


@pytest.mark.gpu
@needs_cuda
def test_gpu_liger_modules_match_plain():
    from tunesmith.models.fast.kernels import liger_unavailable_reason

    if liger_unavailable_reason():
        pytest.skip(liger_unavailable_reason())
    plain, fast, ref = gpu_models()
    assert apply_liger_kernels(fast, "on") == {"rms_norm": 2 * 2 + 1, "swiglu": 2}
    check_against_fp32(plain, fast, ref, gpu_batch(), {"chunked": False})
