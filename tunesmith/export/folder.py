"""Output folders: destination checks, free space, side files (config, tokenizer, generation config)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tunesmith.errors import TunesmithError
from tunesmith.export.shards import format_size, is_weight_file

TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "tokenizer.model", "spiece.model", "vocab.json", "merges.txt",
    "vocab.txt", "qwen.tiktoken", "tokenizer.tiktoken",
})

DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def check_destination(dst: Path, *, overwrite: bool, sources: list[Path]) -> None:
    """Refuse an existing destination (unless overwrite) and one that is, or contains, an input."""
    dst_r = dst.resolve()
    for src in sources:
        src_r = Path(src).resolve()
        if dst_r == src_r or dst_r in src_r.parents:
            raise TunesmithError(f"the destination {dst} would replace the input {src}",
                                 "choose another SAVE_DIR")
    if dst.exists():
        if not dst.is_dir():
            raise TunesmithError(f"the destination {dst} exists and is a file", "choose another SAVE_DIR")
        if not overwrite and any(dst.iterdir()):
            raise TunesmithError(f"the destination {dst} already exists and is not empty",
                                 "choose another SAVE_DIR, or pass --overwrite to replace it")


def check_free_space(dst: Path, needed: int) -> None:
    """TunesmithError before writing anything when the disk cannot hold `needed` bytes (plus 1% and 64 MB)."""
    probe = dst if dst.exists() else dst.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    want = int(needed * 1.01) + 64 * 2**20
    if free < want:
        raise TunesmithError(
            f"not enough disk space for {dst}: it needs about {format_size(want)}, {format_size(free)} are free",
            "free some space or choose a SAVE_DIR on another disk (a smaller --dtype also helps)",
        )


def copy_side_files(src: Path, dst: Path, *, skip_tokenizer: bool = False) -> list[str]:
    """Copy the top-level files of a model folder that are not weights (config, generation config,
    tokenizer, remote code, README ...). Sub-folders are not copied (e.g. Llama 3's original/ weights)."""
    copied = []
    for item in sorted(Path(src).iterdir()):
        if not item.is_file() or item.name.startswith(".") or is_weight_file(item.name):
            continue
        if skip_tokenizer and item.name in TOKENIZER_FILES:
            continue
        shutil.copy2(item, dst / item.name)
        copied.append(item.name)
    return copied


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """The tokenizer files of `src` (an adapter folder written by pth_to_hf, or a model folder)."""
    copied = []
    for name in sorted(TOKENIZER_FILES):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    extra = src / "additional_chat_templates"
    if extra.is_dir():
        shutil.copytree(extra, dst / extra.name, dirs_exist_ok=True)
    return copied


def has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file() and any(
        (folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model"))


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TunesmithError(f"{path} is missing") from None
    except json.JSONDecodeError as exc:
        raise TunesmithError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def set_config_dtype(config: dict, dtype: torch.dtype | None) -> dict:
    """config.json with its weights dtype set (both the v4 `torch_dtype` and the v5 `dtype` key if present)."""
    if dtype is None or dtype not in DTYPE_NAMES:
        return config
    keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
    for key in keys:
        config[key] = DTYPE_NAMES[dtype]
    return config


def write_generation_config_if_missing(dst: Path, config: dict) -> None:
    if (dst / "generation_config.json").exists():
        return
    ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
    write_json(dst / "generation_config.json", ids)
