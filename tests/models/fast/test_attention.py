"""Packed attention (varlen and the per-sample loop) against plain SDPA and separate samples."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from tests.models.fast.helpers import (
    apply_paths,
    assert_same_loss_and_grads,
    check_against_fp32,
    gpu_batch,
    gpu_models,
    lora,
    needs_cuda,
    packed_batch,
    tiny_llama,
)
from tunesmith.models.fast import (
    PACKED_SDPA,
    attention,
    model_loss_sum,
    varlen,
)
from tunesmith.models.fast.attention import (
    packing_from_position_ids,
    set_attention,
)

# ------------------------------------------------------------------------------------- packed attention


def test_sample_spans_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert packing_from_position_ids(pos).spans == [[(0, 3), (3, 5), (5, 6)], [(0, 6)]]
    assert packing_from_position_ids(torch.arange(6).view(1, -1)) is None


def test_packing_cu_seqlens_span_the_flattened_rows():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    p = packing_from_position_ids(pos)
    assert p.cu_seqlens.dtype == torch.int32 and p.cu_seqlens.tolist() == [0, 3, 5, 6, 12]
    assert p.max_len == 6
    # one [1, L] tensor shared by three rows
    shared = torch.tensor([[0, 1, 0, 1, 2]])
    p3 = packing_from_position_ids(shared, 3)
    assert p3.cu_seqlens.tolist() == [0, 2, 5, 7, 10, 12, 15] and p3.max_len == 3
    assert p3.spans == [[(0, 2), (2, 5)]] * 3
    # every row one sample: nothing to do
    assert packing_from_position_ids(torch.arange(5).repeat(2, 1)) is None


def test_packing_is_computed_once_per_forward_pass(monkeypatch):
    """One host copy per batch, shared by every layer and by the checkpointed layers' recompute."""
    calls = []
    real = attention._host_copy
    monkeypatch.setattr(attention, "_host_copy", lambda t: calls.append(1) or real(t))
    model = lora(tiny_llama(layers=3))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    set_attention(model, PACKED_SDPA)
    batch = packed_batch()
    loss, _ = model_loss_sum(model, batch, chunked=False)
    loss.backward()
    assert len(calls) == 1
    batch2 = {k: v.clone() for k, v in batch.items()}
    model_loss_sum(model, batch2, chunked=False)[0].backward()
    assert len(calls) == 2  # a new batch is a new tensor: computed again, never stale


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """What the flash kernel computes, in plain torch: causal attention of each cu_q segment over the same cu_k
    segment of the keys, the mask aligned to the bottom right where a segment has more keys than queries."""
    assert cu_q.dtype == cu_k.dtype == torch.int32 and q.dim() == 3 and q.is_contiguous() and k.is_contiguous()
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for (s, e), (ks_, ke) in zip(itertools.pairwise(cu_q.tolist()), itertools.pairwise(cu_k.tolist())):
        assert 0 < e - s <= max_q and 0 < ke - ks_ <= max_k
        qs = q[s:e].transpose(0, 1)
        ks, vs = (t[ks_:ke].transpose(0, 1).repeat_interleave(groups, 0) for t in (k, v))
        mask = torch.ones(e - s, ke - ks_, dtype=torch.bool).tril(ke - ks_ - (e - s))
        out[s:e] = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale).transpose(0, 1)
    return out


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_varlen_plumbing_matches_plain_with_an_emulated_kernel(monkeypatch, kv_heads):
    """The single-call path (layouts, cu_seqlens across rows, grouped heads, gradients) on CPU, with the flash
    kernel replaced by :func:`_reference_varlen`; the real kernel is checked by the gpu tests."""
    monkeypatch.setattr(attention, "packed_backend", lambda q, k, dropout=0.0: "varlen")
    monkeypatch.setattr(varlen, "flash_forward", _reference_varlen)
    batch = packed_batch()
    ref_model = lora(tiny_llama(kv_heads=kv_heads))
    fast_model = copy.deepcopy(ref_model)
    set_attention(fast_model, PACKED_SDPA)
    # the recompute of checkpointed layers goes through the same path
    fast_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fast_model.train()
    ref_model.train()
    assert_same_loss_and_grads(fast_model, ref_model, batch)


@pytest.mark.parametrize("from_collator", [False, True])
def test_boundaries_handed_to_the_layers_match_plain_without_host_copies(monkeypatch, from_collator):
    """``model_loss_sum`` finds the sample boundaries once (from the collator's ``cu_seq_lens``, or from
    ``position_ids``) and hands them to every layer as ``cu_seq_lens_q`` / ``max_length_q``: the layers then
    need no host copy, and the result is the plain path's (kernel emulated on CPU as above)."""
    from tunesmith.data.pack import cu_seqlens_from_position_ids

    monkeypatch.setattr(attention, "varlen_possible", lambda device: True)
    monkeypatch.setattr(attention, "inputs_fit_varlen", lambda q, k, dropout: not dropout)
    seen = []
    monkeypatch.setattr(
        varlen, "flash_forward", lambda q, k, v, cu, *rest: seen.append(cu) or _reference_varlen(q, k, v, cu, *rest)
    )
    copies = []
    real_copy = attention._host_copy
    monkeypatch.setattr(attention, "_host_copy", lambda t: copies.append(1) or real_copy(t))
    batch = packed_batch()
    if from_collator:
        batch["cu_seq_lens"] = cu_seqlens_from_position_ids(batch["position_ids"])
    ref_model = lora(tiny_llama(layers=3))
    fast_model = copy.deepcopy(ref_model)
    set_attention(fast_model, PACKED_SDPA)
    fast_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fast_model.train()
    ref_model.train()
    assert_same_loss_and_grads(fast_model, ref_model, batch)
    assert len(seen) == 6  # three layers, forward and checkpoint recompute
    assert all(cu.tolist() == [0, 5, 14, 17, 24, 29, 38, 41, 48] for cu in seen)
    assert len(copies) == (0 if from_collator else 1)


def test_packing_kwargs_only_for_packed_rows_the_kernel_can_take(monkeypatch):
    from tunesmith.models.fast.attention import packing_kwargs

    batch = packed_batch()
    assert packing_kwargs(batch) == {}  # CPU: the varlen kernel cannot run, layers find the packing themselves
    monkeypatch.setattr(attention, "varlen_possible", lambda device: True)
    kw = packing_kwargs(batch)
    assert kw["cu_seq_lens_q"] is kw["cu_seq_lens_k"] and kw["cu_seq_lens_q"].tolist()[:3] == [0, 5, 14]
    assert kw["max_length_q"] == kw["max_length_k"] == 24  # the row length: an upper bound, the same every batch
    assert packing_kwargs({**batch, "attention_mask": torch.ones_like(batch["input_ids"])}) == {}
    one_each = {"input_ids": torch.zeros(2, 6, dtype=torch.long), "position_ids": torch.arange(6).repeat(2, 1)}
    assert packing_kwargs(one_each) == {}
    assert packing_kwargs({**one_each, "cu_seq_lens": torch.tensor([0, 6, 12], dtype=torch.int32)}) == {}


def test_varlen_call_matches_the_ops_schema_on_meta_tensors():
    """The real op, shapes only (meta tensors): argument order, output layout and its backward."""
    assert varlen.flash_varlen_available()
    b, h, length, d = 2, 4, 12, 16
    q = torch.randn(b, length, h, d, device="meta", dtype=torch.bfloat16, requires_grad=True)
    kv = torch.randn(b, length, 2, d, device="meta", dtype=torch.bfloat16, requires_grad=True)
    packing = attention.Packing(
        spans=[[(0, 5), (5, 12)], [(0, 12)]],
        cu_seqlens=torch.tensor([0, 5, 12, 24], dtype=torch.int32, device="meta"),
        max_len=12,
    )
    out = attention.flash_varlen(q.transpose(1, 2), kv.transpose(1, 2), kv.transpose(1, 2), packing, 0.25)
    assert out.shape == (b, length, h, d)
    out.sum().backward()
    assert q.grad.shape == q.shape and kv.grad.shape == kv.shape


def test_packed_backend_choice(monkeypatch):
    q = torch.randn(1, 4, 8, 16)
    assert attention.packed_backend(q, q) == "loop"  # CPU, fp32
    if torch.cuda.is_available():
        qc = q.cuda().bfloat16()
        assert attention.packed_backend(qc, qc, dropout=0.1) == "loop"
        monkeypatch.setattr(varlen, "BACKEND", "loop")
        assert attention.packed_backend(qc, qc) == "loop"


def test_varlen_failure_falls_back_to_the_loop(monkeypatch, caplog):
    def broken(*a, **k):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(attention, "packed_backend", lambda q, k, dropout=0.0: "varlen")
    monkeypatch.setattr(varlen, "flash_forward", broken)
    monkeypatch.setattr(varlen, "_varlen_broken", None)
    model = tiny_llama()
    batch = packed_batch()
    with torch.no_grad():
        plain = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        set_attention(model, PACKED_SDPA)
        fast = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    assert varlen._varlen_broken and "no kernel image" in varlen._varlen_broken


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_packed_attention_matches_sdpa_and_separate_samples(kv_heads):
    model = tiny_llama(kv_heads=kv_heads)
    batch = packed_batch()
    ids, pos = batch["input_ids"], batch["position_ids"]
    with torch.no_grad():
        plain = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        set_attention(model, PACKED_SDPA)
        assert model.config._attn_implementation == PACKED_SDPA
        fast = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        # each sample alone, no packing at all
        alone = []
        start = 0
        for n in (5, 9, 3, 7):
            alone.append(model(input_ids=ids[:, start : start + n]).logits)
            start += n
        alone = torch.cat(alone, dim=1)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast, alone, atol=1e-5, rtol=1e-5)


def test_packed_attention_gradients_match_plain():
    batch = packed_batch()
    ref_model = lora(tiny_llama())
    fast_model = copy.deepcopy(ref_model)
    from tunesmith.config.schema import TrainConfig

    apply_paths(fast_model, TrainConfig(method="lora", speed={"liger_kernel": "off", "fused_lora": False}))
    assert fast_model.get_base_model().config._attn_implementation == PACKED_SDPA
    assert_same_loss_and_grads(fast_model, ref_model, batch)


def test_packed_attention_falls_back_for_padding_masks():
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        set_attention(model, PACKED_SDPA)
        fast = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(fast[mask.bool()], plain[mask.bool()], atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@needs_cuda
def test_gpu_packed_attention_matches_plain():
    plain, fast, ref = gpu_models()
    set_attention(fast, PACKED_SDPA)
    check_against_fp32(plain, fast, ref, gpu_batch(), {"chunked": False})


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_gpu_varlen_kernel_matches_per_sample_sdpa(kv_heads):
    """The single flash-varlen call against one SDPA call per sample (the loop), bf16, two packed rows:
    outputs and q / k / v gradients."""
    if attention.packed_backend(torch.zeros(1, 1, 1, 64, device="cuda", dtype=torch.bfloat16),
                                torch.zeros(1, 1, 1, 64, device="cuda", dtype=torch.bfloat16)) != "varlen":
        pytest.skip(f"varlen flash kernel not usable here ({varlen._varlen_broken or 'see packed_backend'})")
    torch.manual_seed(0)
    batch = gpu_batch()
    pos = batch["position_ids"]
    b, length = pos.shape
    q0 = torch.randn(b, length, 8, 64, device="cuda", dtype=torch.bfloat16)
    kv0 = torch.randn(b, length, kv_heads * 2, 64, device="cuda", dtype=torch.bfloat16)
    results = []
    for fn in (attention.flash_varlen, attention.loop_attention):
        q = q0.clone().requires_grad_()
        kv = kv0.clone().requires_grad_()
        k, v = kv[..., :kv_heads, :].transpose(1, 2), kv[..., kv_heads:, :].transpose(1, 2)
        packing = packing_from_position_ids(pos)
        out = fn(q.transpose(1, 2), k, v, packing, 0.125)
        assert out.shape == (b, length, 8, 64)
        (out.float() * torch.linspace(-1, 1, 64, device="cuda")).sum().backward()
        results.append((out.float(), q.grad.float(), kv.grad.float()))
    for got, want in zip(results[0], results[1]):
        rel = float((got - want).norm() / want.norm())
        assert rel < 2e-2, rel


@pytest.mark.gpu
@needs_cuda
def test_gpu_packed_attention_uses_varlen_and_matches_plain_with_grouped_heads(monkeypatch):
    plain = lora(tiny_llama(dtype=torch.bfloat16, device="cuda", vocab=1000, layers=2, kv_heads=2)).cuda()
    fast = copy.deepcopy(plain)
    ref = copy.deepcopy(plain).float()
    set_attention(fast, PACKED_SDPA)
    q = torch.zeros(1, 4, 8, 16, device="cuda", dtype=torch.bfloat16)
    assert attention.packed_backend(q, q) == "varlen", varlen._varlen_broken
    calls = []
    real = varlen.flash_forward
    monkeypatch.setattr(varlen, "flash_forward", lambda *a: calls.append(1) or real(*a))
    check_against_fp32(plain, fast, ref, gpu_batch(), {"chunked": False})
    assert varlen._varlen_broken is None
    assert len(calls) == 2  # one call per layer for the one forward pass of the fast model
