"""`convert pth_to_hf`: a training checkpoint folder (work_dir/epoch_N.pth) -> a Hugging Face folder.

- LoRA / QLoRA: the checkpoint already holds PEFT's own adapter layout, so the adapter folder is written from
  it directly: no base model (and for QLoRA no quantized model, XTuner's OOM #715 / #931) is ever loaded.
  Only the tokenizer is read from the base, and saved with the training template as its `chat_template`.
- full fine-tuning: a complete model folder (the base's config, weights sharded by max_shard_size, tokenizer
  with the chat template). InternLM v1 / v2 fine-tunes are written back in the base's own layout.

DeepSpeed ZeRO checkpoints need nothing special: `tunesmith train` gathers the ZeRO shards into full tensors
when it saves (meta.json records `deepspeed` and `zero_stage`).

Tensors are cast to fp16 unless fp32=True; bf16 tensors stay bf16 (fp16's smaller range could overflow what
bf16 holds, and bf16 is already half the size). The config is copied as `tunesmith_config.yaml`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunesmith.errors import TunesmithError
from tunesmith.export.folder import (
    check_destination,
    check_free_space,
    copy_side_files,
    read_json,
    set_config_dtype,
    write_generation_config_if_missing,
    write_json,
)
from tunesmith.export.layout import layout_for
from tunesmith.export.prompt_record import META_FILE, prompt_record
from tunesmith.export.shards import (
    ShardWriter,
    TensorRef,
    byte_progress,
    list_tensors,
    nbytes_of,
    parse_size,
    plan_shards,
)
from tunesmith.files import atomic_path

CONFIG_COPY = "tunesmith_config.yaml"


@dataclass
class PthToHfResult:
    save_dir: Path
    kind: str  # "adapter" or "model"
    files: list[str]
    dtype: str
    base_model: str


def export_dtype(dtype: torch.dtype, fp32: bool) -> torch.dtype:
    """fp32 -> fp16 unless fp32; bf16 / fp16 / integer tensors keep their dtype."""
    if dtype == torch.float32 and not fp32:
        return torch.float16
    return dtype


# ------------------------------------------------------------------------------------------ checks
def _not_a_checkpoint(pth: Path) -> TunesmithError:
    if pth.is_file():
        return TunesmithError(
            f"{pth} is a file; tunesmith checkpoints are folders (work_dir/epoch_N.pth/ with meta.json)",
            "pass the epoch_N.pth or iter_N.pth folder that `tunesmith train` wrote (XTuner's pickled .pth files "
            "are not read: they can run code)",
        )
    if (pth / "latest").is_file() or any(pth.glob("global_step*")) or any(pth.glob("*model_states.pt")):
        return TunesmithError(
            f"{pth} is a raw DeepSpeed checkpoint, not a tunesmith checkpoint",
            "tunesmith train gathers ZeRO shards itself and writes epoch_N.pth folders; for another trainer's "
            "ZeRO folder run its zero_to_fp32.py first",
        )
    if (pth / "last_checkpoint").is_file() or any((p / "meta.json").is_file() for p in pth.glob("*.pth")):
        from tunesmith.train.checkpoint import find_last_checkpoint

        newest = find_last_checkpoint(pth)
        return TunesmithError(f"{pth} is a work dir, not a checkpoint",
                              f"pass one of its checkpoints, e.g. {newest}" if newest else "pass an epoch_N.pth folder")
    return TunesmithError(f"{pth} is not a tunesmith checkpoint (no meta.json)",
                          "pass the work_dir/epoch_N.pth folder that `tunesmith train` wrote")


def read_checkpoint_meta(pth: Path) -> dict[str, Any]:
    from tunesmith.train.checkpoint import read_meta

    if not pth.exists():
        raise TunesmithError(f"checkpoint {pth} does not exist", "pass the work_dir/epoch_N.pth folder")
    if not pth.is_dir() or not (pth / "meta.json").is_file():
        raise _not_a_checkpoint(pth)
    return read_meta(pth)


# What decides the adapter's shape and the prompt it was trained on. The rest (data path, steps, lr, ...) may
# differ, so a config used with `--set data.path=... training.max_steps=...` at training time still converts.
ADAPTER_KEYS = ("method", "model", "quantization", "lora", "data.prompt_template", "data.system",
                "data.system_template", "data.model_default_system")


def _adapter_settings(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if any(k == key or k.startswith(key + ".") for key in ADAPTER_KEYS)}


def check_config_matches(cfg, meta: dict[str, Any], config_name: str, pth: Path) -> None:
    """The config must describe the checkpoint's model: same method, base model, quantization, LoRA and
    template as the config saved in the checkpoint (training-only keys may differ)."""
    import yaml

    from tunesmith.config import config_hash
    from tunesmith.config.load import flat_settings, run_settings

    hint = f"pass the config that trained it (a copy is in {pth / 'config.yaml'})"
    method = meta.get("method")
    if method and method != cfg.method:
        raise TunesmithError(f"checkpoint {pth} was trained with method {method!r}, config {config_name} says "
                             f"{cfg.method!r}", hint)
    saved_file = pth / "config.yaml"
    if saved_file.is_file():
        raw = yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {}
        # defaults filled in, so that a key added to the schema after the checkpoint compares as its default
        saved = _adapter_settings(run_settings(raw) or flat_settings(raw))
        ours = _adapter_settings(flat_settings(cfg))
        differ = sorted(k for k in saved.keys() | ours.keys() if saved.get(k) != ours.get(k))
        if differ:
            shown = ", ".join(f"{k}: {saved.get(k)!r} vs {ours.get(k)!r}" for k in differ[:3])
            raise TunesmithError(f"checkpoint {pth} was trained with another model setup than {config_name} "
                                 f"({shown})", hint)
        return
    expected = meta.get("config_hash")  # no saved config: only the whole-config hash can tell
    actual = config_hash(cfg)
    if expected and expected != actual:
        raise TunesmithError(f"checkpoint {pth} was written by a different config than {config_name} "
                             f"(config hash {expected}, this config {actual})", hint)


def _base_model_id(path: str) -> str:
    """What adapter_config.json records as the base: an absolute folder for local paths and builtin models."""
    from tunesmith.models.resolve import BUILTIN_PREFIX, resolve_model_path

    local = Path(path).expanduser()
    if local.exists():
        return str(local.resolve())
    if path.startswith(BUILTIN_PREFIX):
        return str(resolve_model_path(path))
    return path


# ------------------------------------------------------------------------------------------ tokenizer
def chat_template_for(tokenizer, cfg) -> str | None:
    """The Jinja chat template rendering the training template (None: keep the tokenizer's own, for 'auto')."""
    from tunesmith.data.render import tokenizer_default_system, tokenizer_info
    from tunesmith.data.templates import (
        chat_template_jinja,
        data_template,
        resolve_system,
    )

    template = data_template(cfg.data)
    if template.is_auto:
        return None
    system = resolve_system(cfg.data.system, cfg.data.system_template)
    default = system or tokenizer_default_system(tokenizer, template)
    add_bos = bool(tokenizer_info(tokenizer).bos_text)
    return chat_template_jinja(template, add_bos=add_bos, default_system=default)


def save_tokenizer(cfg, dst: Path) -> None:
    """The base's tokenizer (tokenizer only, no weights) with the training chat template, saved into dst."""
    from tunesmith.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.tokenizer_path or cfg.model.path,
                               trust_remote_code=cfg.model.trust_remote_code)
    template = chat_template_for(tokenizer, cfg)
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(str(dst))


# ------------------------------------------------------------------------------------------ writers
def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, safe: bool) -> None:
    if safe:
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata={"format": "pt"})
    else:
        torch.save(tensors, path)


def _write_adapter(pth: Path, tmp: Path, cfg, meta, *, fp32: bool, safe: bool) -> tuple[list[str], str]:
    from tunesmith.export.shards import load_state_dict

    weights = pth / "adapter_model.safetensors"
    config_file = pth / "adapter_config.json"
    if not weights.is_file() or not config_file.is_file():
        raise TunesmithError(f"checkpoint {pth} (method {meta.get('method')}) has no adapter_model.safetensors "
                             "and adapter_config.json", "the checkpoint is incomplete: use another epoch_N.pth")
    state = load_state_dict(weights)
    out = {k: v.to(export_dtype(v.dtype, fp32)).contiguous() for k, v in state.items()}
    adapter_config = read_json(config_file)
    adapter_config["base_model_name_or_path"] = _base_model_id(cfg.model.path)
    adapter_config["inference_mode"] = True
    name = "adapter_model.safetensors" if safe else "adapter_model.bin"
    _save_tensors(out, tmp / name, safe)
    write_json(tmp / "adapter_config.json", adapter_config)
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in out.values()})
    return [name, "adapter_config.json"], "/".join(dtypes)


def _full_model_stream(ckpt_refs: list[TensorRef], base_dir: Path, config: dict):
    """(base-layout name, [checkpoint refs joined into it]) in the order to write them."""
    layout = layout_for(config)
    if layout.name == "native":
        for ref in ckpt_refs:
            yield ref.name, [ref]
        return
    from tunesmith.models.resolve import weight_files

    by_name = {r.name: r for r in ckpt_refs}
    used: set[str] = set()
    for base_ref in list_tensors(weight_files(base_dir)):
        parts = layout.trained_names(base_ref.name, base_ref.shape)
        if not parts:
            continue  # buffers without a trained counterpart (rotary inv_freq)
        missing = [n for n, _ in parts if n not in by_name]
        if missing:
            if base_ref.name.endswith("output.weight") or base_ref.name == "lm_head.weight":
                continue  # a tied head, stored once as the embedding
            raise TunesmithError(f"checkpoint model.safetensors lacks {missing[0]} of the base model {base_dir}",
                                 "pass the config that trained this checkpoint")
        used.update(n for n, _ in parts)
        yield base_ref.name, [by_name[n] for n, _ in parts]
    extra = [n for n in by_name if n not in used]
    if extra:
        raise TunesmithError(f"checkpoint model.safetensors has {len(extra)} tensors the base model {base_dir} "
                             f"lacks (e.g. {extra[0]})", "pass the config that trained this checkpoint")


def _write_full(pth: Path, tmp: Path, cfg, *, fp32: bool, safe: bool, max_bytes: int,
                progress: Callable[[int, int], None] | None) -> tuple[list[str], str, int]:
    from tunesmith.models.resolve import read_config, resolve_model_path

    weights = pth / "model.safetensors"
    if not weights.is_file():
        raise TunesmithError(f"checkpoint {pth} (method full) has no model.safetensors",
                             "the checkpoint is incomplete: use another epoch_N.pth")
    base_dir = resolve_model_path(cfg.model.path)
    config = read_config(base_dir)
    layout = layout_for(config)
    ckpt_refs = list_tensors([weights])
    stream = list(_full_model_stream(ckpt_refs, base_dir, config))
    entries = []
    for name, refs in stream:
        dtype = export_dtype(refs[0].dtype, fp32)
        shape = refs[0].shape if len(refs) == 1 else (sum(r.shape[0] for r in refs), *refs[0].shape[1:])
        entries.append((name, dtype, shape))
    plan = plan_shards(entries, max_bytes)
    total = sum(nbytes_of(d, s) for _, d, s in entries)
    check_free_space(tmp, total)
    on_bytes = byte_progress(total, progress)

    writer = ShardWriter(tmp, plan, safe=safe, on_bytes=on_bytes)
    try:
        for (name, refs), (_, dtype, _) in zip(stream, entries):
            value = layout.join(name, [r.load() for r in refs])
            writer.write(name, value.to(dtype))
        writer.finish()
    finally:
        writer.abort()
    copy_side_files(base_dir, tmp, skip_tokenizer=True)
    sizes: dict[torch.dtype, int] = {}
    for _, d, s in entries:
        if d.is_floating_point:
            sizes[d] = sizes.get(d, 0) + nbytes_of(d, s)
    main_dtype = max(sizes, key=sizes.get) if sizes else None
    write_json(tmp / "config.json", set_config_dtype(dict(config), main_dtype))
    write_generation_config_if_missing(tmp, config)
    dtypes = sorted({str(d).replace("torch.", "") for _, d, _ in entries})
    return writer.names, "/".join(dtypes), total


# ------------------------------------------------------------------------------------------ entry point
def pth_to_hf(
    config: str | Path,
    pth: str | Path,
    save_dir: str | Path,
    *,
    fp32: bool = False,
    max_shard_size: str | int = "2GB",
    safe_serialization: bool = True,
    overwrite: bool = False,
    overrides: list[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PthToHfResult:
    """Convert the checkpoint folder `pth`, trained with `config`, into a PEFT adapter folder (LoRA / QLoRA)
    or a complete Hugging Face model folder (full fine-tuning) at `save_dir`."""
    from tunesmith.config import load_config

    max_bytes = parse_size(max_shard_size)
    pth = Path(pth)
    save_dir = Path(save_dir)
    cfg, _ = load_config(str(config), overrides)
    meta = read_checkpoint_meta(pth)
    check_config_matches(cfg, meta, str(config), pth)
    check_destination(save_dir, overwrite=overwrite, sources=[pth])
    method = meta.get("method", cfg.method)
    with atomic_path(save_dir, is_dir=True) as tmp:
        if method in ("lora", "qlora"):
            files, dtype = _write_adapter(pth, tmp, cfg, meta, fp32=fp32, safe=safe_serialization)
            kind = "adapter"
        else:
            files, dtype, _ = _write_full(pth, tmp, cfg, fp32=fp32, safe=safe_serialization, max_bytes=max_bytes,
                                          progress=progress)
            kind = "model"
        save_tokenizer(cfg, tmp)
        config_text = (pth / "config.yaml").read_text(encoding="utf-8") if (pth / "config.yaml").is_file() else None
        if config_text is None:
            from tunesmith.config import dump_config

            config_text = dump_config(cfg, Path(str(config)).stem, CONFIG_COPY)
        (tmp / CONFIG_COPY).write_text(config_text, encoding="utf-8")
        (tmp / META_FILE).write_text(json.dumps(
            {"source": str(pth.resolve()), "epoch": meta.get("epoch"), "step": meta.get("step"),
             "method": method, "config_hash": meta.get("config_hash"), "prompt": prompt_record(cfg)},
            indent=2) + "\n", encoding="utf-8")
    return PthToHfResult(save_dir, kind, files, dtype, str(cfg.model.path))
