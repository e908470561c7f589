"""Writing a converted copy of a model folder (InternLM v1 / v2 as a plain Llama folder, with its tokenizer)."""

from __future__ import annotations

from pathlib import Path

import torch

from tunesmith.errors import TunesmithError
from tunesmith.files import atomic_path
from tunesmith.models.internlm import is_internlm, load_internlm
from tunesmith.models.resolve import read_config, resolve_model_path
from tunesmith.models.tokenizer import load_tokenizer


def convert_internlm_folder(src: str | Path, dst: str | Path, *, max_shard_size: str = "5GB") -> Path:
    """Write a plain Llama copy of an InternLM v1 / v2 folder (weights in their stored dtype + tokenizer)."""
    src = resolve_model_path(src)
    config = read_config(src)
    if not is_internlm(config):
        raise TunesmithError(
            f"{src} is a {config.get('model_type')!r} model, not InternLM",
            "convert_internlm_folder only maps model_type internlm / internlm2",
        )
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(config.get("torch_dtype"), torch.float32)
    model = load_internlm(src, config, dtype=dtype)
    tokenizer = load_tokenizer(src)
    with atomic_path(dst, is_dir=True) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
    return Path(dst)
