"""Exactness of every fast path against the plain path (DESIGN principle 3).

CPU tests run in fp32 and compare within 1e-5; the ``gpu`` tests run each fast path in bf16 on a small shape
and compare loss and LoRA gradients with bf16 tolerances (they are skipped without CUDA).
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.models.fast import (
    PACKED_SDPA,
    apply_fast_paths,
    apply_fused_lora,
    apply_liger_kernels,
    attention,
    causal_lm_loss_sum,
    model_loss_sum,
    remove_fused_lora,
    set_checkpointed_layers,
)
from tunesmith.models.fast.attention import (
    packing_from_position_ids,
    set_attention,
)
from tunesmith.models.fast.loss import auto_chunk_size

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_llama(*, kv_heads: int = 4, vocab: int = 97, layers: int = 2, dtype=torch.float32, device="cpu", attn="sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        attention_bias=True,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation=attn, dtype=dtype).to(device)
    return model


def lora(model, dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=dropout,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, cfg)
    # LoRA B starts at zero; make it non-zero so LoRA A gets gradients worth comparing
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def packed_batch(lengths=(5, 9, 3, 7), vocab: int = 97, rows: int = 2, device="cpu", seed: int = 1):
    """Rows of several packed samples: position ids restart per sample, labels -100 on each sample's first
    tokens (its 'prompt') and on the first token of every sample."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    ids = torch.randint(0, vocab, (rows, total), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths]).repeat(rows, 1)
    labels = ids.clone()
    labels[pos < 2] = -100  # two prompt tokens per sample, no loss
    if rows > 1:
        labels[1, -4:] = -100  # some trailing ignored positions
    return {"input_ids": ids.to(device), "labels": labels.to(device), "position_ids": pos.to(device)}


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def assert_same_loss_and_grads(fast_model, ref_model, batch) -> None:
    """One backward through each model: same summed loss and same gradients (fp32 tolerances)."""
    loss_ref, _ = model_loss_sum(ref_model, batch, chunked=False)
    loss_ref.backward()
    loss, _ = model_loss_sum(fast_model, batch, chunked=False)
    loss.backward()
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-6)
    assert_close_dicts(grads(fast_model), grads(ref_model), atol=1e-5, rtol=1e-5)


def assert_close_dicts(a, b, atol, rtol=0.0):
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), atol=atol, rtol=rtol, msg=lambda m, k=k: f"{k}: {m}")


# ----------------------------------------------------------------------------------------------- loss


def plain_loss(hidden, weight, bias, labels, position_ids=None):
    logits = F.linear(hidden, weight, bias)[:, :-1].float()
    targets = labels[:, 1:].clone()
    if position_ids is not None:
        targets[position_ids[:, 1:] == 0] = -100
    return nn.CrossEntropyLoss(reduction="sum")(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


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


def _reference_varlen(q, k, v, cu, max_len, scale):
    """What the flash kernel computes, in plain torch: causal attention inside each cu segment."""
    assert cu.dtype == torch.int32 and q.dim() == 3 and q.is_contiguous() and k.is_contiguous()
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for s, e in itertools.pairwise(bounds):
        assert 0 < e - s <= max_len
        qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        out[s:e] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1)
    return out


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_varlen_plumbing_matches_plain_with_an_emulated_kernel(monkeypatch, kv_heads):
    """The single-call path (layouts, cu_seqlens across rows, grouped heads, gradients) on CPU, with the flash
    kernel replaced by :func:`_reference_varlen`; the real kernel is checked by the gpu tests."""
    monkeypatch.setattr(attention, "packed_backend", lambda q, k, dropout=0.0: "varlen")
    monkeypatch.setattr(attention, "_flash_forward", _reference_varlen)
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
    monkeypatch.setattr(attention, "_inputs_fit_varlen", lambda q, k, dropout: not dropout)
    seen = []
    monkeypatch.setattr(
        attention, "_flash_forward", lambda q, k, v, cu, m, s: seen.append(cu) or _reference_varlen(q, k, v, cu, m, s)
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
    info = _apply(fast_model, cfg).counts
    assert info["compiled_layers"] == 2
    assert info["compiled_nf4_linears"] == (14 if method == "qlora" else 0)
    _apply(ref_model, TrainConfig(method=method, speed={"compile": False}))
    try:
        for _ in range(2):  # the second pass runs the cached graphs
            ref_model.zero_grad(set_to_none=True)
            fast_model.zero_grad(set_to_none=True)
            opts = _apply_plan(cfg).loss_options()
            loss_ref, _ = model_loss_sum(ref_model, batch, **opts)
            loss_ref.backward()
            loss, _ = model_loss_sum(fast_model, batch, **opts)
            loss.backward()
            torch.testing.assert_close(loss, loss_ref, atol=1e-4, rtol=1e-5)
            assert_close_dicts(grads(fast_model), grads(ref_model), atol=1e-4, rtol=1e-4)
        assert not counters["graph_break"], dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()


def test_varlen_call_matches_the_ops_schema_on_meta_tensors():
    """The real op, shapes only (meta tensors): argument order, output layout and its backward."""
    assert attention.flash_varlen_available()
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
        monkeypatch.setattr(attention, "BACKEND", "loop")
        assert attention.packed_backend(qc, qc) == "loop"


def test_varlen_failure_falls_back_to_the_loop(monkeypatch, caplog):
    def broken(*a, **k):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(attention, "packed_backend", lambda q, k, dropout=0.0: "varlen")
    monkeypatch.setattr(attention, "_flash_forward", broken)
    monkeypatch.setattr(attention, "_varlen_broken", None)
    model = tiny_llama()
    batch = packed_batch()
    with torch.no_grad():
        plain = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        set_attention(model, PACKED_SDPA)
        fast = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    assert attention._varlen_broken and "no kernel image" in attention._varlen_broken


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

    _apply(fast_model, TrainConfig(method="lora", speed={"liger_kernel": "off", "fused_lora": False}))
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


# ------------------------------------------------------------------------------ apply_fast_paths, config


def _apply(model, cfg, device="cpu", deepspeed_stage=0):
    return apply_fast_paths(model, cfg.speed, packed=cfg.data.pack_to_max_length, deepspeed_stage=deepspeed_stage,
                            device=device)


def _apply_plan(cfg, device="cpu", deepspeed_stage=0):
    from tunesmith.models.fast import plan_fast_paths

    return plan_fast_paths(cfg.speed, packed=cfg.data.pack_to_max_length, deepspeed_stage=deepspeed_stage,
                           device=device)


def test_apply_fast_paths_on_cpu_end_to_end_matches_plain():
    from tunesmith.config.schema import TrainConfig

    cfg = TrainConfig(method="lora")
    batch = packed_batch()
    ref_model = lora(tiny_llama(), dropout=0.1)
    fast_model = copy.deepcopy(ref_model)
    fast = _apply(fast_model, cfg)
    assert fast.attention == PACKED_SDPA
    assert not fast.liger_modules and "rms_norm" not in fast.counts  # no CUDA here: auto is a clean no-op
    assert fast.counts["fused_lora_layers"] == 14
    opts = fast.loss_options()
    assert opts == {"chunked": True, "use_liger": False}
    torch.manual_seed(5)
    loss_ref, n_ref = model_loss_sum(ref_model, batch, chunked=False)
    loss_ref.backward()
    torch.manual_seed(5)
    loss, n = model_loss_sum(fast_model, batch, **opts)
    loss.backward()
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-6)
    assert int(n) == int(n_ref)
    assert_close_dicts(grads(fast_model), grads(ref_model), atol=1e-5, rtol=1e-5)


def test_apply_fast_paths_all_off_leaves_model_alone():
    from tunesmith.config.schema import TrainConfig

    cfg = TrainConfig(
        method="lora", speed={"packed_attention": False, "liger_kernel": "off", "chunked_loss": False}
    )
    cfg.speed.fused_lora = False
    model = lora(tiny_llama())
    fast = _apply(model, cfg)
    assert model.get_base_model().config._attn_implementation == "sdpa"
    assert fast.loss_options() == {"chunked": False, "use_liger": False} and fast.counts == {}
    assert not any(type(m).__name__.startswith("Fused") for m in model.modules())


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
    loss_ref, _ = model_loss_sum(ref, batch, chunked=False)
    loss_ref.backward()
    loss, _ = model_loss_sum(fast, batch, chunked=False)
    loss.backward()
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-6)
    assert_close_dicts(grads(fast), grads(ref), atol=1e-5, rtol=1e-5)


def test_set_checkpointed_layers():
    model = tiny_llama(layers=4)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert set_checkpointed_layers(model, 0) == 4
    assert set_checkpointed_layers(model, 3) == 1
    flags = [layer.gradient_checkpointing for layer in model.model.layers]
    assert flags == [True, False, False, False]
    assert set_checkpointed_layers(model, 10) == 0


# ---------------------------------------------------------------------------------------- GPU (bf16)
# Each fast path runs in bf16 next to the plain bf16 path, and both are compared with an fp32 copy of the same
# model (plain path): the fast path's error must stay within twice the plain path's own bf16 error (plus a
# small floor), for the per-token loss and for every LoRA gradient (relative norm).


def _gpu_models():
    plain = lora(tiny_llama(dtype=torch.bfloat16, device="cuda", vocab=1000, layers=2)).cuda()
    fast = copy.deepcopy(plain)
    ref = copy.deepcopy(plain).float()
    return plain, fast, ref


def _gpu_batch():
    """Two packed rows, with the boundaries the collator adds (as the train loop hands them over)."""
    from tunesmith.data.pack import cu_seqlens_from_position_ids

    batch = packed_batch(lengths=(100, 300, 50, 60), vocab=1000, device="cuda")
    return {**batch, "cu_seq_lens": cu_seqlens_from_position_ids(batch["position_ids"].cpu()).cuda()}


def _run(model, batch, **opts):
    model.zero_grad(set_to_none=True)
    loss, n = model_loss_sum(model, batch, **opts)
    (loss / n).backward()
    return float(loss.detach() / n), grads(model)


def _rel_err(a, b):
    assert a.keys() == b.keys() and a
    worst = 0.0
    for k in a:
        num = (a[k].float() - b[k].float()).norm()
        den = b[k].float().norm().clamp_min(1e-12)
        worst = max(worst, float(num / den))
    return worst


def _check_against_fp32(plain, fast, ref, batch, fast_opts, loss_floor=2e-2, grad_floor=1e-2):
    l_ref, g_ref = _run(ref, batch, chunked=False)
    l_plain, g_plain = _run(plain, batch, chunked=False)
    l_fast, g_fast = _run(fast, batch, **fast_opts)
    e_loss_plain, e_loss_fast = abs(l_plain - l_ref), abs(l_fast - l_ref)
    e_grad_plain, e_grad_fast = _rel_err(g_plain, g_ref), _rel_err(g_fast, g_ref)
    msg = (
        f"loss err plain {e_loss_plain:.2e} fast {e_loss_fast:.2e}; "
        f"grad err plain {e_grad_plain:.2e} fast {e_grad_fast:.2e}"
    )
    print(msg)
    assert e_loss_fast <= 2 * e_loss_plain + loss_floor, msg
    assert e_grad_fast <= 2 * e_grad_plain + grad_floor, msg


@pytest.mark.gpu
@needs_cuda
def test_gpu_liger_modules_match_plain():
    from tunesmith.models.fast.kernels import liger_unavailable_reason

    if liger_unavailable_reason():
        pytest.skip(liger_unavailable_reason())
    plain, fast, ref = _gpu_models()
    assert apply_liger_kernels(fast, "on") == {"rms_norm": 2 * 2 + 1, "swiglu": 2}
    _check_against_fp32(plain, fast, ref, _gpu_batch(), {"chunked": False})


@pytest.mark.gpu
@needs_cuda
def test_gpu_packed_attention_matches_plain():
    plain, fast, ref = _gpu_models()
    set_attention(fast, PACKED_SDPA)
    _check_against_fp32(plain, fast, ref, _gpu_batch(), {"chunked": False})


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_gpu_varlen_kernel_matches_per_sample_sdpa(kv_heads):
    """The single flash-varlen call against one SDPA call per sample (the loop), bf16, two packed rows:
    outputs and q / k / v gradients."""
    if attention.packed_backend(torch.zeros(1, 1, 1, 64, device="cuda", dtype=torch.bfloat16),
                                torch.zeros(1, 1, 1, 64, device="cuda", dtype=torch.bfloat16)) != "varlen":
        pytest.skip(f"varlen flash kernel not usable here ({attention._varlen_broken or 'see packed_backend'})")
    torch.manual_seed(0)
    batch = _gpu_batch()
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
    assert attention.packed_backend(q, q) == "varlen", attention._varlen_broken
    calls = []
    real = attention._flash_forward
    monkeypatch.setattr(attention, "_flash_forward", lambda *a: calls.append(1) or real(*a))
    _check_against_fp32(plain, fast, ref, _gpu_batch(), {"chunked": False})
    assert attention._varlen_broken is None
    assert len(calls) == 2  # one call per layer for the one forward pass of the fast model


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("use_liger", [False, True])
def test_gpu_chunked_and_fused_linear_ce_match_plain(use_liger):
    from tunesmith.models.fast.kernels import liger_unavailable_reason

    if use_liger and liger_unavailable_reason():
        pytest.skip(liger_unavailable_reason())
    plain, fast, ref = _gpu_models()
    _check_against_fp32(plain, fast, ref, _gpu_batch(), {"chunked": True, "use_liger": use_liger, "chunk_size": 128})


@pytest.mark.gpu
@needs_cuda
def test_gpu_fused_lora_matches_peft():
    plain, fast, ref = _gpu_models()
    assert apply_fused_lora(fast) == 2 * 7
    _check_against_fp32(plain, fast, ref, _gpu_batch(), {"chunked": False})


@pytest.mark.gpu
@needs_cuda
def test_gpu_all_fast_paths_match_plain():
    from tunesmith.config.schema import TrainConfig

    cfg = TrainConfig(method="lora")
    plain, fast, ref = _gpu_models()
    opts = _apply(fast, cfg, "cuda").loss_options()
    _check_against_fp32(plain, fast, ref, _gpu_batch(), opts)


@pytest.mark.gpu
@needs_cuda
def test_gpu_qlora_fast_paths_match_plain():
    """NF4 base: fused LoRA over bitsandbytes' Linear4bit, liger, packed attention, fused CE."""
    pytest.importorskip("bitsandbytes")
    from tunesmith.bench.baseline import quantize_nf4
    from tunesmith.config.schema import TrainConfig

    base = tiny_llama(dtype=torch.bfloat16, device="cuda", vocab=1000, layers=2)
    quantize_nf4(base, torch.bfloat16)
    plain = lora(base)
    fast = copy.deepcopy(plain)
    cfg = TrainConfig(method="qlora")
    applied = _apply(fast, cfg, "cuda")
    assert applied.counts["fused_lora_layers"] == 2 * 7
    batch = _gpu_batch()
    l_plain, g_plain = _run(plain, batch, chunked=False)
    l_fast, g_fast = _run(fast, batch, **applied.loss_options())
    assert abs(l_fast - l_plain) < 3e-2
    assert _rel_err(g_fast, g_plain) < 5e-2


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
        plain, fast, ref = _gpu_models()
    for m in (plain, fast):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
        set_checkpointed_layers(m, 1)
    cfg = TrainConfig(method=method, speed={"compile": True})
    applied = _apply(fast, cfg, "cuda")
    assert applied.compiled_layers == 2
    opts = applied.loss_options()
    batch = _gpu_batch()
    try:
        if ref is not None:
            _check_against_fp32(plain, fast, ref, batch, opts)
        else:
            l_plain, g_plain = _run(plain, batch, chunked=False)
            l_fast, g_fast = _run(fast, batch, **opts)
            assert abs(l_fast - l_plain) < 3e-2
            assert _rel_err(g_fast, g_plain) < 5e-2
        _run(fast, batch, **opts)  # again: the cached graphs
        assert not counters["graph_break"], dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_fast_paths_decided_for_a_cuda_target_on_any_machine(method):
    """What `tunesmith train` decides for a model that will train on a GPU, pinned here on the CPU: compiled
    layers (also under ZeRO-1/2), fused LoRA, packed attention, chunked loss; eager under ZeRO-3."""
    from tunesmith.config.schema import TrainConfig

    cfg = TrainConfig(method=method)
    fast = _apply_plan(cfg, device=torch.device("cuda"))
    assert fast.compiled and fast.compile_reason == "compile auto" and fast.device == "cuda"
    assert fast.fused_lora and fast.packed_attention and fast.chunked_loss
    for stage in (1, 2):
        assert _apply_plan(cfg, device="cuda", deepspeed_stage=stage).compiled
    zero3 = _apply_plan(cfg, device="cuda", deepspeed_stage=3)
    assert not zero3.compiled and "ZeRO-3" in zero3.compile_reason and not zero3.fused_lora
    cpu = _apply_plan(cfg, device="cpu")
    assert not cpu.compiled and "not on a CUDA GPU" in cpu.compile_reason and not cpu.liger_loss
    unpacked = TrainConfig(method=method, data={"pack_to_max_length": False})
    assert not _apply_plan(unpacked, device="cuda").compiled
    assert _apply_plan(TrainConfig(method=method, speed={"compile": "on"}), "cuda", 3).compiled
    assert not _apply_plan(TrainConfig(method=method, speed={"compile": False}), "cuda").compiled
    line = fast.describe()
    assert "fast paths on cuda" in line and "compiled layers" in line and "fused LoRA" in line


def test_embeddings_on_host_only_where_one_process_owns_a_gpu_model():
    from tunesmith.config.schema import TrainConfig

    cfg = TrainConfig(method="qlora", speed={"embeddings_on_host": True})
    assert _apply_plan(cfg, device="cuda").embeddings_on_host
    assert not _apply_plan(cfg, device="cuda", deepspeed_stage=2).embeddings_on_host  # DeepSpeed moves it back
    assert not _apply_plan(cfg, device="cpu").embeddings_on_host
    from tunesmith.models.fast import plan_fast_paths

    assert not plan_fast_paths(cfg.speed, packed=True, deepspeed_stage=0, device="cuda", world_size=2).embeddings_on_host
    assert not _apply_plan(TrainConfig(method="qlora"), device="cuda").embeddings_on_host  # off by default


def test_host_embedding_is_the_same_lookup_and_keeps_its_keys():
    from tunesmith.models.fast.host_embedding import HostEmbedding, host_embedding_possible, move_embeddings_to_host

    batch = packed_batch()
    ref_model = lora(tiny_llama())
    fast_model = copy.deepcopy(ref_model)
    keys = set(fast_model.state_dict())
    assert move_embeddings_to_host(fast_model, torch.device("cpu"))
    assert isinstance(fast_model.get_base_model().get_input_embeddings(), HostEmbedding)
    assert set(fast_model.state_dict()) == keys
    assert_same_loss_and_grads(fast_model, ref_model, batch)
    tied = tiny_llama()
    tied.lm_head.weight = tied.model.embed_tokens.weight
    tied.requires_grad_(False)
    assert not host_embedding_possible(tied)  # the head reads the same table
    assert not host_embedding_possible(tiny_llama())  # trainable (full fine-tuning)


@pytest.mark.gpu
@needs_cuda
def test_gpu_host_embedding_step_matches_the_device_embedding():
    """A training step with the table on the host and the token ids handed over there: same loss and gradients,
    and the table takes no GPU memory."""
    from tunesmith.config.schema import TrainConfig
    from tunesmith.train.loss import CausalLMLoss
    from tunesmith.train.step import LocalBackend, TrainStep

    torch.manual_seed(0)
    plain, fast, _ = _gpu_models()
    cfg = TrainConfig(method="lora", speed={"embeddings_on_host": True, "compile": "off"})
    applied = _apply(fast, cfg, "cuda")
    _apply(plain, TrainConfig(method="lora", speed={"compile": "off"}), "cuda")
    assert applied.counts["embeddings_on_host"] == 1 and applied.host_inputs == ("input_ids",)
    assert fast.get_base_model().get_input_embeddings().weight.device.type == "cpu"
    batch = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in _gpu_batch().items()}
    batch["num_loss_tokens"] = int((batch["labels"][:, 1:] != -100).sum())
    losses, all_grads = [], []
    for model, host in ((plain, ()), (fast, applied.host_inputs)):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.0)
        step = TrainStep(LocalBackend(CausalLMLoss(model, applied.loss_options()), opt, params, precision="bf16",
                                      device=torch.device("cuda"), max_norm=None), torch.device("cuda"), host)
        for p in params:  # keep the gradients for the comparison (the step clears them)
            p.register_post_accumulate_grad_hook(lambda p: all_grads.append(p.grad.detach().clone()))
        losses.append(step([batch]).loss)
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    half = len(all_grads) // 2
    for a, b in zip(all_grads[:half], all_grads[half:]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_liger_on_for_a_cpu_target_is_a_user_error():
    from tunesmith.config.schema import TrainConfig

    with pytest.raises(TunesmithError, match="liger_kernel"):
        _apply_plan(TrainConfig(method="lora", speed={"liger_kernel": "on"}), device="cpu")


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


class _FakeCard:
    """Stands in for a GPU in the activation planner: the peak of a step is ``base`` plus, per layer, the bytes a
    compiled layer keeps at the compiled budget (``per_layer[budget]``) or ``whole`` when checkpointed whole."""

    def __init__(self, model, base, per_layer, whole, fail_above=None):
        import torch._functorch.config as functorch_config

        self.config, self.model = functorch_config, model
        self.base, self.per_layer, self.whole, self.fail_above = base, per_layer, whole, fail_above
        self.compiled_with = []
        self.resets = 0

    def layers(self):
        return [m for m in self.model.modules() if type(m).__name__ == "LlamaDecoderLayer"]

    def budget(self):
        return self.config.activation_memory_budget

    def peak_of(self, step):
        step()
        b = self.budget()
        per = self.per_layer(b) if callable(self.per_layer) else self.per_layer[b]
        peak = self.base + sum(self.whole if layer.gradient_checkpointing else per for layer in self.layers())
        if self.fail_above is not None and peak > self.fail_above:
            raise torch.OutOfMemoryError("probe")
        return peak


def _planner_model(layers=8):
    model = tiny_llama(layers=layers)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def test_activation_plan_keeps_everything_when_it_fits():
    from tunesmith.models.fast.checkpointing import fit_compiled_activations

    gib = 2**30
    model = _planner_model()
    card = _FakeCard(model, 10 * gib, {1.0: 1 * gib}, 0.1 * gib)
    try:
        plan = fit_compiled_activations(model, lambda: None, 40 * gib, peak_of=card.peak_of)
        assert (plan.fraction, plan.whole_layers, plan.fits) == (1.0, 0, True)
        assert len(plan.probes) == 1 and plan.peak == 18 * gib
        assert not any(layer.gradient_checkpointing for layer in card.layers())
        assert "keep 100% of their activations, 0/8 layers checkpointed whole" in plan.describe()
    finally:
        card.config.activation_memory_budget = 1.0


def test_activation_plan_interpolates_a_budget_between_everything_and_whole_layers():
    from tunesmith.models.fast.checkpointing import fit_compiled_activations

    gib = 2**30
    model = _planner_model()
    # kept bytes fall faster near 1 than near 0 (the partitioner drops its least useful activations first)
    card = _FakeCard(model, 10 * gib, lambda b: (0.1 + 0.9 * b**2) * gib, 0.1 * gib)
    try:
        plan = fit_compiled_activations(model, lambda: None, 14 * gib, peak_of=card.peak_of)
        limit = 14 * gib
        assert plan.whole_layers == 0 and 0.01 < plan.fraction < 1.0 and plan.peak <= limit
        assert [(f, w) for f, w, _ in plan.probes] == [(1.0, 0), (1.0, 8), (plan.fraction, 0)]  # two compilations
        assert card.budget() == plan.fraction  # the graphs of the plan stay compiled
    finally:
        card.config.activation_memory_budget = 1.0


def test_activation_plan_adds_whole_layers_when_a_budget_alone_does_not_fit():
    """The issue's cliff: 5 % of the activations did not fit and everything went whole, at more memory than the
    refused option. Now whole layers are added on top of the budget, only as many as needed."""
    from tunesmith.models.fast.checkpointing import fit_compiled_activations

    gib = 2**30
    model = _planner_model()
    per = {1.0: 1.0 * gib}
    card = _FakeCard(model, 10 * gib, lambda b: per.get(b, 0.3 * gib), 0.1 * gib)  # a budget's floor: 0.3 GiB
    try:
        plan = fit_compiled_activations(model, lambda: None, 12.25 * gib, peak_of=card.peak_of)
        limit = 12.25 * gib
        assert plan.fits and plan.peak <= limit and 0 < plan.whole_layers < 8 and plan.fraction < 1.0
        refused = [p for f, w, p in plan.probes if p > limit]
        assert all(p > plan.peak for p in refused)
        flags = [layer.gradient_checkpointing for layer in card.layers()]
        assert flags == [True] * plan.whole_layers + [False] * (8 - plan.whole_layers)
    finally:
        card.config.activation_memory_budget = 1.0


def test_activation_plan_takes_the_least_memory_when_nothing_fits_and_survives_out_of_memory():
    from tunesmith.models.fast.checkpointing import fit_compiled_activations

    gib = 2**30
    model = _planner_model()
    card = _FakeCard(model, 10 * gib, {1.0: 1 * gib}, 0.1 * gib, fail_above=15 * gib)
    try:
        plan = fit_compiled_activations(model, lambda: None, 9 * gib, peak_of=card.peak_of)
        assert plan.probes[0][2] == float("inf")  # the first probe ran out of memory: it does not fit
        assert plan.whole_layers == 8 and not plan.fits and plan.peak == min(p for _, _, p in plan.probes)
        assert "nothing tried fits" in plan.describe()
        assert all(layer.gradient_checkpointing for layer in card.layers())
    finally:
        card.config.activation_memory_budget = 1.0
