"""Chunked and fused cross-entropy against the full-logits loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.models.fast.helpers import (
    assert_close_dicts,
    check_against_fp32,
    gpu_batch,
    gpu_models,
    grads,
    lora,
    needs_cuda,
    packed_batch,
    plain_loss,
    tiny_llama,
)
from tunesmith.errors import TunesmithError
from tunesmith.models.fast import (
    causal_lm_loss_sum,
    model_loss_sum,
)
from tunesmith.models.fast.loss import auto_chunk_size


@pytest.mark.parametrize("chunk", [1, 3, 16, 4096])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_loss_matches_cross_entropy(chunk, with_bias):
    torch.manual_seed(0)
    b, length, h, v = 2, 24, 16, 50
    hidden = torch.randn(b, length, h, requires_grad=True)
    head = nn.Linear(h, v, bias=with_bias)
    labels = torch.randint(0, v, (b, length))
    labels[0, :5] = -100
    labels[1, 10:13] = -100
    pos = torch.cat([torch.arange(10), torch.arange(14)]).repeat(b, 1)

    ref = plain_loss(hidden, head.weight, head.bias, labels, pos)
    ref.backward()
    ref_grads = [hidden.grad.clone(), head.weight.grad.clone()] + ([head.bias.grad.clone()] if with_bias else [])
    hidden.grad = None
    head.zero_grad()

    loss, n = causal_lm_loss_sum(hidden, head, labels, chunk_size=chunk, position_ids=pos, use_liger=False)
    loss.backward()
    got = [hidden.grad, head.weight.grad] + ([head.bias.grad] if with_bias else [])
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-6)
    expected_n = ((labels[:, 1:] != -100) & (pos[:, 1:] != 0)).sum()
    assert int(n) == int(expected_n)
    for x, y in zip(got, ref_grads):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_chunked_loss_backward_scales_with_upstream_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(1, 12, 8, requires_grad=True)
    head = nn.Linear(8, 30, bias=False)
    labels = torch.randint(0, 30, (1, 12))
    loss, n = causal_lm_loss_sum(hidden, head, labels, chunk_size=4, use_liger=False)
    (loss / n * 3.0).backward()
    g1 = hidden.grad.clone()
    hidden.grad = None
    ref = plain_loss(hidden, head.weight, None, labels)
    (ref / n * 3.0).backward()
    torch.testing.assert_close(g1, hidden.grad, atol=1e-6, rtol=1e-5)


def test_chunked_loss_generic_head_and_weight_tensor():
    torch.manual_seed(0)
    hidden = torch.randn(2, 10, 8, requires_grad=True)
    head = nn.Sequential(nn.Linear(8, 30))  # not a plain Linear: per-chunk checkpointing path
    labels = torch.randint(0, 30, (2, 10))
    labels[:, :3] = -100
    ref = plain_loss(hidden, head[0].weight, head[0].bias, labels)
    loss, _ = causal_lm_loss_sum(hidden, head, labels, chunk_size=3)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-6)
    loss_w, _ = causal_lm_loss_sum(hidden, head[0].weight.detach(), labels, chunk_size=3, use_liger=False)
    ref_w = plain_loss(hidden, head[0].weight, None, labels)
    torch.testing.assert_close(loss_w, ref_w, atol=1e-5, rtol=1e-6)


def test_chunked_loss_uses_the_head_module_when_zero3_partitions_its_weight():
    torch.manual_seed(0)
    hidden = torch.randn(1, 10, 8, requires_grad=True)
    head = nn.Linear(8, 30, bias=False)
    labels = torch.randint(0, 30, (1, 10))
    ref = plain_loss(hidden, head.weight, None, labels)
    head.weight.ds_id = 7  # what DeepSpeed ZeRO-3 marks its partitioned parameters with
    calls = []
    head.register_forward_hook(lambda *a: calls.append(1))
    loss, _ = causal_lm_loss_sum(hidden, head, labels, chunk_size=4, use_liger=False)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-6)
    assert calls  # went through the module's forward, where ZeRO-3 gathers the weight


def test_chunked_loss_all_ignored_is_zero_and_backward_works():
    hidden = torch.randn(1, 6, 8, requires_grad=True)
    head = nn.Linear(8, 30)
    labels = torch.full((1, 6), -100)
    loss, n = causal_lm_loss_sum(hidden, head, labels)
    assert float(loss.detach()) == 0.0 and int(n) == 0
    loss.backward()
    assert hidden.grad is not None and float(hidden.grad.abs().sum()) == 0.0


def test_auto_chunk_size():
    assert auto_chunk_size(103168) == 512
    assert auto_chunk_size(32000) == 2048
    assert 128 <= auto_chunk_size(10**7) <= 4096


def test_use_liger_true_on_cpu_is_a_user_error():
    hidden = torch.randn(1, 6, 8)
    with pytest.raises(TunesmithError):
        causal_lm_loss_sum(hidden, nn.Linear(8, 30), torch.randint(0, 30, (1, 6)), use_liger=True)


def test_model_loss_sum_chunked_matches_plain_on_tiny_lora_model():
    model = lora(tiny_llama())
    batch = packed_batch()
    torch.manual_seed(3)
    loss_ref, n_ref = model_loss_sum(model, batch, chunked=False)
    loss_ref.backward()
    ref = grads(model)
    model.zero_grad()
    torch.manual_seed(3)
    loss, n = model_loss_sum(model, batch, chunked=True, chunk_size=7, use_liger=False)
    loss.backward()
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-6)
    assert int(n) == int(n_ref) > 0
    assert_close_dicts(grads(model), ref, atol=1e-5, rtol=1e-5)


def test_model_loss_sum_matches_transformers_own_loss():
    """The plain path itself agrees with transformers' ForCausalLMLoss (mean over the same tokens).

    use_cache=False matters: with a cache, transformers does not derive the packed mask from position_ids and
    attention crosses samples (model_loss_sum always passes use_cache=False)."""
    model = tiny_llama()
    batch = packed_batch()
    loss, n = model_loss_sum(model, batch, chunked=True, use_liger=False)
    out = model(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"], use_cache=False
    )
    torch.testing.assert_close(loss / n, out.loss, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("use_liger", [False, True])
def test_gpu_chunked_and_fused_linear_ce_match_plain(use_liger):
    from tunesmith.models.fast.kernels import liger_unavailable_reason

    if use_liger and liger_unavailable_reason():
        pytest.skip(liger_unavailable_reason())
    plain, fast, ref = gpu_models()
    check_against_fp32(plain, fast, ref, gpu_batch(), {"chunked": True, "use_liger": use_liger, "chunk_size": 128})
