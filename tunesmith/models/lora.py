"""Getting a loaded model ready to train: k-bit preparation, LoRA (peft), gradient checkpointing."""

from __future__ import annotations

import sys
import warnings

from torch import nn


def _linear_types() -> tuple[type, ...]:
    types: list[type] = [nn.Linear]
    # a quantized model has imported bitsandbytes already; importing it otherwise only costs time and CPU warnings
    bnb = sys.modules.get("bitsandbytes")
    if bnb is not None:
        types += [bnb.nn.Linear4bit, bnb.nn.Linear8bitLt]
    return tuple(types)


def find_all_linear_names(model: nn.Module) -> list[str]:
    """Leaf names of every Linear (plain, 4-bit, 8-bit) except the output head, as XTuner's helper.

    For Llama-shaped models: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.
    """
    linear = _linear_types()
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    names = set()
    for full_name, module in model.named_modules():
        if not isinstance(module, linear) or module is head:
            continue
        leaf = full_name.rsplit(".", 1)[-1]
        if leaf in ("lm_head", "output_layer", "output"):  # heads of models without get_output_embeddings
            continue
        names.add(leaf)
    return sorted(names)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as the values they hold, not packed bytes."""
    trainable = total = 0
    for p in model.parameters():
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        n = shape.numel() if shape is not None else p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def keep_4bit_differentiable(model: nn.Module) -> int:
    """Keep every bitsandbytes ``Linear4bit`` of a model that will train on bitsandbytes' differentiable matmul.

    On a CPU with AVX512-BF16, ``Linear4bit.forward`` in eval mode without grad repacks its weight in place, once,
    for bitsandbytes' CPU inference kernel ``gemv_4bit``, and every later call takes that kernel, in train mode too:
    bf16 arithmetic and no autograd formula, so the gradient to the layer's input is dropped (PyTorch warns "an
    autograd kernel was not registered") and the LoRA gradients of every earlier layer come out wrong. The loop
    answers its evaluation prompts in eval mode before step 1, so the repacking is switched off (bitsandbytes'
    per-layer flag) and a weight repacked already is unpacked with bitsandbytes' own inverse (what its ``.cuda()``
    does). Returns how many were unpacked. Checked against fp32 dequantized weights: test_qlora_cpu_grads.py.
    """
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:  # nothing is quantized
        return 0
    unpacked = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        if hasattr(module, "support_avx512bf16_for_cpu"):  # versions without the CPU repacking lack the flag
            module.support_avx512bf16_for_cpu = False
        weight = module.weight
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            unpacked += 1
    return unpacked


def _is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)) or (
        getattr(model, "hf_quantizer", None) is not None
    )


def enable_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing on every decoder layer, non-re-entrant (works with frozen inputs and peft)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def prepare_for_training(model: nn.Module, cfg) -> nn.Module:
    """Make `model` trainable for cfg.method ('qlora' | 'lora' | 'full'); returns the model to train.

    - 4-bit layers kept on bitsandbytes' differentiable matmul (:func:`keep_4bit_differentiable`).
    - qlora / lora: every base weight frozen, LoRA (cfg.lora) on all linear layers except the head (or
      cfg.lora.target_modules), adapters in fp32. Unlike peft's prepare_model_for_kbit_training we do not
      upcast the frozen embeddings, norms and head to fp32: frozen weights get no optimizer update, RMSNorm
      already computes in fp32, and a 7B vocabulary in fp32 costs ~1.5 GB for nothing.
    - full: every parameter trainable.
    - gradient checkpointing (cfg.training.gradient_checkpointing) without re-entrant autograd, with input
      grads enabled so checkpointed blocks under a frozen embedding still see a grad-requiring input.
    - use_cache off, and train() mode: from_pretrained returns eval mode, where transformers silently skips
      checkpointing.
    """
    method = cfg.method
    if method == "full" and _is_quantized(model):
        # the config checks refuse this combination; reaching here means a caller bypassed them
        raise ValueError("full fine-tuning needs an unquantized model (load it without bits)")
    model.config.use_cache = False
    keep_4bit_differentiable(model)
    for p in model.parameters():
        p.requires_grad_(method == "full")
    if cfg.training.gradient_checkpointing:
        enable_checkpointing(model)
        if method != "full":
            model.enable_input_require_grads()
    if method in ("lora", "qlora"):
        model = _add_lora(model, cfg.lora)
    model.train()
    return model


def _add_lora(model: nn.Module, lora) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = lora.target_modules
    if targets == "all-linear":
        targets = find_all_linear_names(model)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias=lora.bias,
        target_modules=list(targets) if not isinstance(targets, str) else targets,
        modules_to_save=list(lora.modules_to_save) or None,
        task_type="CAUSAL_LM",
    )
    # autocast_adapter_dtype (default on) keeps the LoRA weights in fp32 under a bf16 / fp16 base
    with warnings.catch_warnings():
        # peft still asks for the old property name; the warning is theirs and says nothing to users
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)
