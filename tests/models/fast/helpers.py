"""Shared builders and comparisons for the fast-path exactness tests: tiny Llama models, LoRA, packed rows, and
(GPU) a bf16 model beside its fp32 copy."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.models.fast import (
    apply_fast_paths,
    model_loss_sum,
)

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


def plain_loss(hidden, weight, bias, labels, position_ids=None):
    logits = F.linear(hidden, weight, bias)[:, :-1].float()
    targets = labels[:, 1:].clone()
    if position_ids is not None:
        targets[position_ids[:, 1:] == 0] = -100
    return nn.CrossEntropyLoss(reduction="sum")(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def apply_paths(model, cfg, device="cpu", deepspeed_stage=0):
    return apply_fast_paths(model, cfg.speed, packed=cfg.data.pack_to_max_length, deepspeed_stage=deepspeed_stage,
                            device=device)


def plan_paths(cfg, device="cpu", deepspeed_stage=0, world_size=1):
    from tunesmith.models.fast import plan_fast_paths

    return plan_fast_paths(cfg.speed, packed=cfg.data.pack_to_max_length, deepspeed_stage=deepspeed_stage,
                           device=device, world_size=world_size)


# GPU (bf16): each fast path runs in bf16 next to the plain bf16 path, and both are compared with an fp32 copy of
# the same model (plain path): the fast path's error must stay within twice the plain path's own bf16 error (plus
# a small floor), for the per-token loss and for every LoRA gradient (relative norm).


def gpu_models():
    plain = lora(tiny_llama(dtype=torch.bfloat16, device="cuda", vocab=1000, layers=2)).cuda()
    fast = copy.deepcopy(plain)
    ref = copy.deepcopy(plain).float()
    return plain, fast, ref


def gpu_batch():
    """Two packed rows, with the boundaries the collator adds (as the train loop hands them over)."""
    from tunesmith.data.pack import cu_seqlens_from_position_ids

    batch = packed_batch(lengths=(100, 300, 50, 60), vocab=1000, device="cuda")
    return {**batch, "cu_seq_lens": cu_seqlens_from_position_ids(batch["position_ids"].cpu()).cuda()}


def run_loss(model, batch, **opts):
    model.zero_grad(set_to_none=True)
    loss, n = model_loss_sum(model, batch, **opts)
    (loss / n).backward()
    return float(loss.detach() / n), grads(model)


def rel_err(a, b):
    assert a.keys() == b.keys() and a
    worst = 0.0
    for k in a:
        num = (a[k].float() - b[k].float()).norm()
        den = b[k].float().norm().clamp_min(1e-12)
        worst = max(worst, float(num / den))
    return worst


def check_against_fp32(plain, fast, ref, batch, fast_opts, loss_floor=2e-2, grad_floor=1e-2):
    l_ref, g_ref = run_loss(ref, batch, chunked=False)
    l_plain, g_plain = run_loss(plain, batch, chunked=False)
    l_fast, g_fast = run_loss(fast, batch, **fast_opts)
    e_loss_plain, e_loss_fast = abs(l_plain - l_ref), abs(l_fast - l_ref)
    e_grad_plain, e_grad_fast = rel_err(g_plain, g_ref), rel_err(g_fast, g_ref)
    msg = (
        f"loss err plain {e_loss_plain:.2e} fast {e_loss_fast:.2e}; "
        f"grad err plain {e_grad_plain:.2e} fast {e_grad_fast:.2e}"
    )
    print(msg)
    assert e_loss_fast <= 2 * e_loss_plain + loss_floor, msg
    assert e_grad_fast <= 2 * e_grad_plain + grad_floor, msg


