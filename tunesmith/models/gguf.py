"""GGUF files -> normal HF folders (dequantized fp32 safetensors + tokenizer + chat template), built once.

transformers reads a GGUF with `gguf_file=` and dequantizes it, but `save_pretrained` of that model fails
(it still carries the GGUF quantizer), so its weights are copied into a fresh model of the same config.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.files import atomic_path
from tunesmith.models.cache import build_lock, models_cache

_SOURCE_FILE = "tunesmith_source.json"  # records which GGUF a cached folder came from


def gguf_cache_folder(gguf: Path) -> Path:
    """One cache folder per GGUF file (by absolute path, size and mtime: an edited file is rebuilt)."""
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return models_cache() / "gguf" / f"{gguf.stem}-{key}"


def materialise_gguf(gguf: Path, folder: Path | None = None) -> Path:
    """Dequantize `gguf` into `folder` (default: the cache) unless it is already there; return the folder."""
    gguf = Path(gguf)
    folder = Path(folder) if folder is not None else gguf_cache_folder(gguf)
    source = {"gguf": gguf.name, "size": gguf.stat().st_size}
    if _is_built(folder, source):
        return folder
    if importlib.util.find_spec("gguf") is None:
        raise TunesmithError(f"reading {gguf} needs the gguf package, which is not installed", "pip install gguf")
    with build_lock(folder):
        if _is_built(folder, source):  # another process finished it while we waited
            return folder
        with atomic_path(folder, is_dir=True) as tmp:
            _write_folder(gguf, tmp)
            (tmp / _SOURCE_FILE).write_text(json.dumps(source) + "\n", encoding="utf-8")
    return folder


def _is_built(folder: Path, source: dict) -> bool:
    try:
        return json.loads((folder / _SOURCE_FILE).read_text(encoding="utf-8")) == source
    except (OSError, ValueError):
        return False


def _write_folder(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    where, name = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise TunesmithError(
            f"cannot read {gguf}: {str(exc).strip().splitlines()[0][:200]}",
            "transformers reads GGUF files of llama / qwen2 / mistral / ... architectures; convert others first",
        ) from None
    config = loaded.config
    # fp32 keeps the dequantized values exact; the loader casts to bf16/fp16 on a GPU anyway
    for stale in ("quantization_config", "_model_name_or_path"):  # GGUF loading leftovers
        if hasattr(config, stale):
            delattr(config, stale)
    config.dtype = torch.float32
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    fresh.tie_weights()
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id if config.pad_token_id is not None else config.eos_token_id,
    ).save_pretrained(out)
