"""QLoRA on the CPU: the loss and every LoRA gradient against the same LoRA on plain fp32 linears holding the
dequantized NF4 weights.

bitsandbytes repacks a ``Linear4bit`` for its CPU inference kernel (``bitsandbytes::gemv_4bit``, bf16, no
autograd) the first time the layer runs in eval mode without grad on a CPU with AVX512-BF16, and keeps that
layout. The training loop answers ``evaluation.inputs`` before step 1, so without ``prepare_for_training``
switching that off, every later training forward went through ``gemv_4bit``: PyTorch warned "an autograd kernel
was not registered", and the gradient reaching a layer's input through its frozen 4-bit weight was dropped
(LoRA gradients of the earlier layers off by up to 79 % in norm on this tiny Llama). Both orders of evaluation
and preparation are checked; on a CPU without AVX512-BF16 bitsandbytes never repacks and the three cases are one.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from tunesmith.config import TrainConfig
from tunesmith.models import load_model, prepare_for_training

bnb = pytest.importorskip("bitsandbytes")
bnbf = pytest.importorskip("bitsandbytes.functional")

# measured on an AVX512-BF16 CPU (bitsandbytes 0.50, torch 2.13): loss and gradients agree to the last fp32 bit
# (max abs difference 0); the bound leaves room for another matmul order in another bitsandbytes / torch
LOSS_TOL = {"atol": 1e-6, "rtol": 1e-6}
GRAD_TOL = {"atol": 1e-7, "rtol": 1e-5}


def _cfg() -> TrainConfig:
    # dropout 0: the two models must see the same activations
    return TrainConfig(method="qlora", lora={"r": 8, "alpha": 16, "dropout": 0.0},
                       quantization={"bits": 4}, model={"path": "unused", "dtype": "fp32"})


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 24), generator=torch.Generator().manual_seed(0))


def _evaluate(model, ids: torch.Tensor) -> None:
    """What the loop's evaluation prompts do to the model: eval mode, no grad, generate, back to train."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model.generate(ids[:1, :8], max_new_tokens=2, do_sample=False, pad_token_id=0)
    model.train(was_training)


def _quantized(folder, cfg: TrainConfig):
    model = load_model(folder, dtype=cfg.model.dtype, quantization=cfg.quantization)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 2 * 7
    return model


def _dequantized_copy(folder, cfg: TrainConfig, quantized) -> nn.Module:
    """The same checkpoint with every ``Linear4bit`` replaced by an fp32 ``nn.Linear`` holding the weight that
    ``quantized`` holds now, as bitsandbytes itself dequantizes it."""
    model = load_model(folder, dtype="fp32", quantization=cfg.quantization)
    source = dict(quantized.named_modules())
    for name, module in list(model.named_modules()):
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        weight = source[f"base_model.model.{name}.base_layer"].weight
        assert not getattr(weight.quant_state, "packing_format_for_cpu", False)
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        plain.weight = nn.Parameter(bnbf.dequantize_4bit(weight.data, weight.quant_state).float())
        if module.bias is not None:
            plain.bias = nn.Parameter(module.bias.detach().float().clone())
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, plain)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    return model


def _loss_and_grads(model, ids: torch.Tensor):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("evaluation", ["none", "after_prepare", "before_prepare"])
def test_qlora_lora_grads_match_dequantized_fp32(tiny_llama, evaluation):
    """``evaluation``: none; after ``prepare_for_training`` (the training loop's order: prompts answered at
    step 0, then training); before it (a Python API user who tried the model first)."""
    cfg = _cfg()
    model = _quantized(tiny_llama, cfg)
    ids = _ids(model.config.vocab_size)
    if evaluation == "before_prepare":
        _evaluate(model, ids)
    torch.manual_seed(0)
    model = prepare_for_training(model, cfg)
    with torch.no_grad():  # B starts at zero; non-zero B gives every A a gradient too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    if evaluation == "after_prepare":
        _evaluate(model, ids)

    ref = prepare_for_training(_dequantized_copy(tiny_llama, cfg, model), cfg)
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert ref.load_state_dict(lora, strict=False).unexpected_keys == []
    assert {n for n, p in ref.named_parameters() if p.requires_grad} == set(lora)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss, grads = _loss_and_grads(model, ids)
    assert not [w for w in caught if "gemv_4bit" in str(w.message)], "4-bit forward without autograd"
    ref_loss, ref_grads = _loss_and_grads(ref, ids)

    torch.testing.assert_close(loss, ref_loss, **LOSS_TOL)
    assert len(grads) == 2 * 7 * 2  # layers x linears x (A, B)
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, ref_grads[name], **GRAD_TOL, msg=lambda m, n=name: f"{n}: {m}")
