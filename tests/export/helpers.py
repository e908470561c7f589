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


def train_config(base: Path, method: str = "lora", template: str = "chatml", **extra):
    """A TrainConfig for the tiny model (what a user's YAML would hold)."""
    from tunesmith.config import TrainConfig

    data = {"method": method, "model": {"path": str(base), "dtype": "fp32"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "data": {"path": "unused.jsonl", "format": "conversation", "prompt_template": template}}
    for section, values in extra.items():
        data.setdefault(section, {}).update(values) if isinstance(values, dict) else data.__setitem__(section, values)
    return TrainConfig.model_validate(data)


def write_config(cfg, path: Path) -> Path:
    from tunesmith.config import dump_config

    path.write_text(dump_config(cfg, path.stem, path.name), encoding="utf-8")
    return path


def write_checkpoint(cfg, folder: Path, *, seed: int = 0, meta_extra: dict | None = None):
    """A checkpoint folder exactly as docs/internals.md specifies it, from a (randomly) trained model.

    Returns (folder, model): the peft model (LoRA / QLoRA) or the plain model (full) that was saved.
    """
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file

    from tunesmith.config import config_hash, dump_config
    from tunesmith.models import find_all_linear_names, load_model

    folder.mkdir(parents=True)
    bits = 4 if cfg.method == "qlora" else None
    model = load_model(cfg.model.path, dtype="fp32", bits=bits)
    if cfg.method in ("lora", "qlora"):
        lcfg = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=find_all_linear_names(model), task_type="CAUSAL_LM")
        model = get_peft_model(model, lcfg)
        randomize_lora(model, seed)
        weights = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}
        save_file(weights, str(folder / "adapter_model.safetensors"))
        adapter_config = model.peft_config["default"].to_dict()
        adapter_config = {k: sorted(v) if isinstance(v, set) else v for k, v in adapter_config.items()}
        (folder / "adapter_config.json").write_text(json.dumps(adapter_config, default=str, indent=2))
    else:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
        state, seen = {}, set()
        for k, v in model.state_dict().items():
            ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
            if ptr in seen:
                continue
            seen.add(ptr)
            state[k] = v.detach().clone().contiguous()
        save_file(state, str(folder / "model.safetensors"))
    save_file({"state.0.exp_avg": torch.zeros(2)}, str(folder / "optimizer.safetensors"))
    (folder / "trainer_state.json").write_text(json.dumps({"step": 2, "epoch": 1}))
    (folder / "config.yaml").write_text(dump_config(cfg, "cfg", "config.yaml"))
    meta = {"format": "tunesmith-checkpoint", "version": 1, "method": cfg.method, "epoch": 1, "step": 2,
            "config_hash": config_hash(cfg), "base_model": cfg.model.path, **(meta_extra or {})}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    model.eval()
    return folder, model
