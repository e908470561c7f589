"""The plain loop every speed number is measured against: what a user writes with transformers + peft.

transformers model in bf16 with SDPA, gradient checkpointing (``use_reentrant=False``), ``model.train()``, peft
LoRA r 64 / alpha 16 / dropout 0.1 on q, k, v, o, gate, up, down, torch AdamW (its default multi-tensor kernel),
``model(input_ids, labels=...).loss.backward()``. QLoRA: NF4 + double quant + bf16 compute, then
``prepare_model_for_kbit_training``. Full: every weight trained in bf16, no peft.
"""

from __future__ import annotations

import torch
from torch import nn

from tunesmith.bench.shapes import Shape

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base_model(shape: Shape, device: torch.device, seq_len: int, dtype: torch.dtype | None = None) -> nn.Module:
    """Random-initialised Llama-architecture model of ``shape``, created directly on ``device`` (bf16 on CUDA,
    fp32 on the CPU unless ``dtype`` says otherwise)."""
    from transformers import LlamaForCausalLM

    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        return LlamaForCausalLM._from_config(shape.llama_config(seq_len), attn_implementation="sdpa", dtype=dtype)


def quantize_nf4(model: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    """Replace every decoder linear with a bitsandbytes NF4 ``Linear4bit`` (double quant, ``compute_dtype``),
    as ``from_pretrained(quantization_config=BitsAndBytesConfig(...))`` would; the head stays unquantized."""
    import bitsandbytes as bnb

    decoder = model.get_decoder()
    for parent in list(decoder.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                  device="meta")
            weight = child.weight.data
            q.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                         module=q)
            q.weight = q.weight.to(weight.device)  # quantizes
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, q)
            del child, weight
    model.is_loaded_in_4bit = True  # what transformers sets; peft dispatches its bnb LoRA layers on it
    model.quantization_method = "bitsandbytes"
    return model


def prepare_baseline(model: nn.Module, method: str) -> nn.Module:
    """peft's usual preparation: k-bit prep for QLoRA, non-re-entrant checkpointing, LoRA, train mode."""
    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, target_modules=LORA_TARGETS,
                                                 task_type="CAUSAL_LM"))
    model.config.use_cache = False
    model.train()
    return model


def baseline_optimizer(model: nn.Module, lr: float = 2e-4) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)


def baseline_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The model's own mean loss over the row (no position ids: packed rows attend across samples, as a plain
    loop over packed data does)."""
    return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss


def baseline_step(model: nn.Module, opt: torch.optim.Optimizer, batch: dict) -> torch.Tensor:
    loss = baseline_loss(model, batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()
