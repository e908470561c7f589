"""Fixtures for the export tests: adapters and training checkpoints (docs/internals.md format) on tiny models."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from helpers import make_adapter, randomize_lora  # noqa: E402


@pytest.fixture(scope="session")
def bases(tiny_llama, tiny_qwen2, tiny_internlm, tiny_internlm2):
    return {"llama": tiny_llama, "qwen2": tiny_qwen2, "internlm": tiny_internlm, "internlm2": tiny_internlm2}


@pytest.fixture(scope="session")
def adapter_factory(tmp_path_factory):
    """make(base_path, **make_adapter options) -> adapter folder, cached for the session."""
    cache: dict[tuple, Path] = {}

    def make(base: Path, **options) -> Path:
        key = (str(base), tuple(sorted((k, str(v)) for k, v in options.items())))
        if key not in cache:
            cache[key] = make_adapter(base, tmp_path_factory.mktemp("adapter"), **options)
        return cache[key]

    return make


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
