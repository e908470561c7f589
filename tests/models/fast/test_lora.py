"""The fused LoRA forward against peft's."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.models.fast.helpers import (
    assert_close_dicts,
    check_against_fp32,
    gpu_batch,
    gpu_models,
    grads,
    lora,
    needs_cuda,
    packed_batch,
    tiny_llama,
)
from tunesmith.models.fast import (
    apply_fused_lora,
    model_loss_sum,
    remove_fused_lora,
)
from tunesmith.models.fast.lora import adapter_off

# ------------------------------------------------------------------------------------------ fused LoRA


def test_fused_lora_matches_peft_with_dropout():
    batch = packed_batch()
    ref_model = lora(tiny_llama(), dropout=0.1)
    fast_model = copy.deepcopy(ref_model)
    n = apply_fused_lora(fast_model)
    assert n == 2 * 7
    ref_model.train()
    fast_model.train()
    torch.manual_seed(11)
    loss_ref, _ = model_loss_sum(ref_model, batch, chunked=False)
    loss_ref.backward()
    torch.manual_seed(11)  # same seed: the same dropout masks, drawn in the same order
    loss, _ = model_loss_sum(fast_model, batch, chunked=False)
    loss.backward()
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-6)
    assert_close_dicts(grads(fast_model), grads(ref_model), atol=1e-5, rtol=1e-5)
    # parameters and saved keys are untouched; undo restores peft's classes
    assert set(dict(fast_model.named_parameters())) == set(dict(ref_model.named_parameters()))
    assert remove_fused_lora(fast_model) == n
    assert type(fast_model.get_base_model().model.layers[0].self_attn.q_proj).__name__ == "Linear"


def test_fused_lora_defers_to_peft_when_adapters_disabled():
    model = lora(tiny_llama())
    apply_fused_lora(model)
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        with model.disable_adapter():
            off = model(input_ids=ids).logits
        on = model(input_ids=ids).logits
    remove_fused_lora(model)
    with torch.no_grad():
        with model.disable_adapter():
            off_ref = model(input_ids=ids).logits
    torch.testing.assert_close(off, off_ref)
    assert not torch.allclose(on, off)


def test_adapter_off_runs_the_base_model_like_peft_and_leaves_the_adapter_as_it_was():
    model = lora(tiny_llama())
    apply_fused_lora(model)
    ids = torch.randint(0, 97, (1, 8))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        with model.disable_adapter():
            off_peft = model(input_ids=ids).logits
        with adapter_off(model):
            off = model(input_ids=ids).logits
            with adapter_off(model):  # nested: the inner exit must not switch the adapter back on
                pass
            inner_exit = model(input_ids=ids).logits
        on = model(input_ids=ids).logits
    torch.testing.assert_close(off, off_peft, atol=0, rtol=0)
    torch.testing.assert_close(inner_exit, off_peft, atol=0, rtol=0)
    assert not torch.allclose(on, off)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    loss = model(input_ids=ids).logits.sum()  # the adapter still trains afterwards
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)
    with pytest.raises(ValueError, match="peft model"):
        with adapter_off(tiny_llama()):
            pass


@pytest.mark.gpu
@needs_cuda
def test_gpu_fused_lora_matches_peft():
    plain, fast, ref = gpu_models()
    assert apply_fused_lora(fast) == 2 * 7
    check_against_fp32(plain, fast, ref, gpu_batch(), {"chunked": False})
