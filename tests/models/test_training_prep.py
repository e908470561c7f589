"""QLoRA / LoRA / full preparation: what is quantized, what trains, what gets gradients."""

from __future__ import annotations

import torch

from tunesmith.config import TrainConfig
from tunesmith.models import count_parameters, find_all_linear_names, load_model, prepare_for_training

LLAMA_LINEARS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def _cfg(method: str, **lora) -> TrainConfig:
    return TrainConfig(method=method, lora={"r": 8, "alpha": 16, **lora})


def _step(model, vocab: int):
    ids = torch.randint(3, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss


def _checkpointing(model) -> bool:
    base = model.base_model.model if hasattr(model, "base_model") and hasattr(model, "peft_config") else model
    return any(getattr(m, "gradient_checkpointing", False) for m in base.modules())


def _grads(model):
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_qlora_on_cpu(tiny_internlm):
    import bitsandbytes as bnb

    model = load_model(tiny_internlm, bits=4, dtype="fp32", device_map={"": "cpu"})
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # 2 layers x q/k/v/o/gate/up/down; the head stays unquantized
    assert quantized[0].weight.quant_type == "nf4" and quantized[0].weight.quant_state.nested  # double quant
    assert find_all_linear_names(model) == LLAMA_LINEARS
    _, total_before = count_parameters(model)

    model = prepare_for_training(model, _cfg("qlora"))
    assert model.training and model.config.use_cache is False
    assert _checkpointing(model)
    trainable, total = count_parameters(model)
    lora_names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert lora_names and all("lora_" in n for n in lora_names)
    assert total - trainable == total_before  # 4-bit weights counted as values, not packed bytes
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)

    loss = _step(model, model.config.vocab_size)
    assert torch.isfinite(loss)
    with_grad = _grads(model)
    assert with_grad and all("lora_" in n for n in with_grad)
    # B starts at zero, so only B has a non-zero gradient on the first step; A has one, just zero
    assert any("lora_B" in n for n in with_grad)
    assert {n for n, p in model.named_parameters() if p.grad is not None} == lora_names


def test_eight_bit_loads_on_cpu(tiny_llama):
    import bitsandbytes as bnb

    model = load_model(tiny_llama, bits=8, device_map={"": "cpu"})
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())


def test_lora_targets_all_linear_but_the_head(tiny_qwen2):
    model = prepare_for_training(load_model(tiny_qwen2, dtype="fp32"), _cfg("lora"))
    config = model.peft_config["default"]
    assert sorted(config.target_modules) == LLAMA_LINEARS
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 16, 0.1)
    assert not any("lm_head" in n and "lora_" in n for n, _ in model.named_parameters())
    _step(model, model.config.vocab_size)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable


def test_lora_explicit_targets_and_bias(tiny_llama):
    cfg = _cfg("lora", target_modules=["q_proj", "v_proj"], bias="none")
    model = prepare_for_training(load_model(tiny_llama, dtype="fp32"), cfg)
    assert sorted(model.peft_config["default"].target_modules) == ["q_proj", "v_proj"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 2 * 2  # layers x (q, v) x (A, B)


def test_full_trains_everything_with_checkpointing(tiny_llama):
    model = prepare_for_training(load_model(tiny_llama, dtype="fp32"), _cfg("full"))
    trainable, total = count_parameters(model)
    assert trainable == total
    assert model.training and _checkpointing(model) and model.config.use_cache is False
    _step(model, model.config.vocab_size)
    assert _grads(model) == {n for n, _ in model.named_parameters()}


def test_checkpointing_off_is_respected(tiny_llama):
    cfg = _cfg("lora")
    cfg.training.gradient_checkpointing = False
    model = prepare_for_training(load_model(tiny_llama, dtype="fp32"), cfg)
    assert not _checkpointing(model)


def test_checkpointing_keeps_the_gradients(tiny_llama):
    def grads(checkpointing: bool) -> dict:
        cfg = _cfg("lora", dropout=0.0)
        cfg.training.gradient_checkpointing = checkpointing
        torch.manual_seed(0)  # same LoRA init in both runs
        model = prepare_for_training(load_model(tiny_llama, dtype="fp32"), cfg)
        with torch.no_grad():  # non-zero B so every LoRA weight gets a gradient
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.01)
        _step(model, model.config.vocab_size)
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    with_ckpt, without = grads(True), grads(False)
    assert with_ckpt.keys() == without.keys() and len(with_ckpt) == 2 * 7 * 2
    for name, grad in with_ckpt.items():
        torch.testing.assert_close(grad, without[name])


def test_quantization_section_drives_the_bnb_config(tiny_llama):
    cfg = TrainConfig(method="qlora", quantization={"quant_type": "fp4", "double_quant": False})
    model = load_model(tiny_llama, dtype="fp32", device_map={"": "cpu"}, quantization=cfg.quantization)
    q = model.config.quantization_config
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "fp4" and not q.bnb_4bit_use_double_quant
