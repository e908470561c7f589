"""Helpers for the export tests: random LoRA adapters on the tiny fixtures, reference logits through peft."""

from __future__ import annotations

import json
from pathlib import Path

import torch

IDS = torch.tensor([[1, 5, 17, 42, 99, 7, 3, 64, 120, 11, 250, 8]])


def randomize_lora(model, seed: int = 0, std: float = 0.05) -> None:
    """Give every trainable adapter tensor (LoRA A/B, trained biases, modules_to_save copies) random values,
    as a few training steps would (lora_B starts at zero, so an untrained adapter merges to nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=gen) * std
            if "lora_" in name:
                p.copy_(noise.to(p.dtype))
            else:  # trained biases and modules_to_save copies: a small change of the original
                p.add_(noise.to(p.dtype))


def make_adapter(base: Path, out: Path, *, r: int = 4, alpha: int = 8, rslora: bool = False, bias: str = "none",
                 modules_to_save: list[str] | None = None, bits: int | None = None, seed: int = 0,
                 target_modules="all-linear", lora_bias: bool = False) -> Path:
    """Save a PEFT adapter trained (randomly) on `base` loaded the tunesmith way (InternLM mapped to Llama,
    bits=4: QLoRA on the NF4-quantized base)."""
    from peft import LoraConfig, get_peft_model

    from tunesmith.models import find_all_linear_names, load_model

    model = load_model(base, dtype="fp32", bits=bits)
    targets = find_all_linear_names(model) if target_modules == "all-linear" else target_modules
    cfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, bias=bias, target_modules=targets,
                     modules_to_save=modules_to_save, lora_dropout=0.0, task_type="CAUSAL_LM", lora_bias=lora_bias)
    peft_model = get_peft_model(model, cfg)
    randomize_lora(peft_model, seed)
    peft_model.save_pretrained(out)
    return out


@torch.no_grad()
def peft_logits(base: Path, adapter: Path, dtype: str = "fp32", ids: torch.Tensor = IDS) -> torch.Tensor:
    from peft import PeftModel

    from tunesmith.models import load_model

    model = PeftModel.from_pretrained(load_model(base, dtype=dtype), str(adapter))
    model.eval()
    return model(input_ids=ids).logits.float()


@torch.no_grad()
def model_logits(folder: Path, dtype: str = "fp32", ids: torch.Tensor = IDS) -> torch.Tensor:
    from tunesmith.models import load_model

    model = load_model(folder, dtype=dtype)
    model.eval()
    return model(input_ids=ids).logits.float()


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))
