"""Compiled decoder layers (and NF4 dequantized inside them) against eager."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.models.fast.helpers import (
    apply_paths,
    assert_close_dicts,
    check_against_fp32,
    gpu_batch,
    gpu_models,
    grads,
    lora,
    needs_cuda,
    packed_batch,
    plan_paths,
    rel_err,
    run_loss,
    tiny_llama,
)
from tunesmith.models.fast import (
    model_loss_sum,
    set_checkpointed_layers,
)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_compiled_layers_match_eager_without_graph_breaks(method):
    """``speed.compile``: every decoder layer compiled (here by inductor's CPU backend), checkpointed and not,
    on packed rows: same loss and LoRA gradients as the eager fast path, and no graph break inside a layer.
    QLoRA: the compiled layers dequantize the NF4 weights with torch ops, the eager ones with bitsandbytes."""
    from torch._dynamo.utils import counters

    from tunesmith.config.schema import TrainConfig

    torch._dynamo.reset()
    counters.clear()
    batch = packed_batch()
    base = tiny_llama(layers=2)
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
        from tunesmith.bench.baseline import quantize_nf4

        quantize_nf4(base, torch.float32)
    ref_model = lora(base)
    ref_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref_model.train()
    fast_model = copy.deepcopy(ref_model)
    set_checkpointed_layers(fast_model, 1)  # one layer of each kind
    set_checkpointed_layers(ref_model, 1)
    cfg = TrainConfig(method=method, speed={"compile": True})
    info = apply_paths(fast_model, cfg).counts
    assert info["compiled_layers"] == 2
    assert info["compiled_nf4_linears"] == (14 if method == "qlora" else 0)
    apply_paths(ref_model, TrainConfig(method=method, speed={"compile": False}))
    try:
        for _ in range(2):  # the second pass runs the cached graphs
            ref_model.zero_grad(set_to_none=True)
            fast_model.zero_grad(set_to_none=True)
            opts = plan_paths(cfg).loss_options()
            loss_ref, _ = model_loss_sum(ref_model, batch, **opts)
            loss_ref.backward()
            loss, _ = model_loss_sum(fast_model, batch, **opts)
            loss.backward()
            torch.testing.assert_close(loss, loss_ref, atol=1e-4, rtol=1e-5)
            assert_close_dicts(grads(fast_model), grads(ref_model), atol=1e-4, rtol=1e-4)
        assert not counters["graph_break"], dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_gpu_compiled_fast_paths_match_plain(method):
    """``speed.compile`` on top of every default fast path (varlen attention fed by the collator's boundaries,
    fused LoRA, fused CE), one layer checkpointed and one not: against the fp32 reference, no graph breaks."""
    from torch._dynamo.utils import counters

    from tunesmith.config.schema import TrainConfig

    torch._dynamo.reset()
    counters.clear()
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
        from tunesmith.bench.baseline import quantize_nf4

        base = tiny_llama(dtype=torch.bfloat16, device="cuda", vocab=1000, layers=2)
        quantize_nf4(base, torch.bfloat16)
        plain = lora(base)
        fast = copy.deepcopy(plain)
        ref = None
    else:
        plain, fast, ref = gpu_models()
    for m in (plain, fast):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
        set_checkpointed_layers(m, 1)
    cfg = TrainConfig(method=method, speed={"compile": True})
    applied = apply_paths(fast, cfg, "cuda")
    assert applied.compiled_layers == 2
    opts = applied.loss_options()
    batch = gpu_batch()
    try:
        if ref is not None:
            check_against_fp32(plain, fast, ref, batch, opts)
        else:
            l_plain, g_plain = run_loss(plain, batch, chunked=False)
            l_fast, g_fast = run_loss(fast, batch, **opts)
            assert abs(l_fast - l_plain) < 3e-2
            assert rel_err(g_fast, g_plain) < 5e-2
        run_loss(fast, batch, **opts)  # again: the cached graphs
        assert not counters["graph_break"], dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()


# ------------------------------------------------------------------------------------ NF4 in compiled layers


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("shape", [(128, 256), (96, 200)])  # 200: a block count that is no multiple of 256
def test_nf4_dequantization_matches_bitsandbytes(nested, shape):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    from tunesmith.models.fast.nf4 import dequantize_nf4

    torch.manual_seed(0)
    w = torch.randn(*shape, dtype=torch.bfloat16)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
    want = bnbf.dequantize_4bit(packed, state)
    got = dequantize_nf4(packed, state)
    assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape == shape
    torch.testing.assert_close(got, want, atol=0, rtol=2**-8)  # at most one bf16 rounding step apart


def test_compiled_nf4_forward_matches_linear4bit(monkeypatch):
    """The torch-op forward (what compiled layers run) against bitsandbytes' own ``Linear4bit.forward``, with
    the input and bias gradients; eagerly (outside a compiled graph) it is bitsandbytes' forward itself."""
    bnb = pytest.importorskip("bitsandbytes")
    from tunesmith.models.fast.nf4 import apply_compiled_nf4

    torch.manual_seed(0)
    dense = nn.Linear(256, 96, bias=True).to(torch.bfloat16)
    layer = bnb.nn.Linear4bit(256, 96, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    layer.weight = layer.weight.to("cpu")  # quantizes (no-op device move)
    layer.bias = nn.Parameter(dense.bias.data.clone())
    if getattr(layer.weight, "quant_state", None) is None:
        pytest.skip("this bitsandbytes does not quantize on the CPU")
    x = torch.randn(3, 5, 256, dtype=torch.bfloat16)
    outs = []
    for fast in (False, True):
        if fast:
            assert apply_compiled_nf4(layer) == 1
            monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        xi = x.clone().requires_grad_()
        layer.bias.grad = None
        y = layer(xi)
        (y.float() * torch.linspace(-1, 1, 96)).sum().backward()
        outs.append((y.float(), xi.grad.float(), layer.bias.grad.float()))
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
