"""`convert merge`: a LoRA adapter merged into its base model, streamed tensor by tensor.

XTuner (and peft's merge_and_unload + save_pretrained) load the whole base model, merge, and save it again:
peak memory is the whole model. Here nothing is ever built: each base tensor is read, gets its update
(`W + scale * B @ A` in fp32, on the GPU when there is one; trained biases and modules_to_save copies replace
it), is cast to the output dtype and appended to an output shard whose header was written in advance.
Peak memory is the adapter plus about one tensor (the largest, usually the embedding), whatever the model size.

The base must be full precision: merging into 4-bit weights would quantize the delta away. InternLM v1 / v2
bases are written back in their own layout (export/layout.py). The output folder gets the index, config,
generation config and the tokenizer (the adapter's, carrying the training chat template, when it has one).
Everything is written to a temporary folder that is renamed into place at the end.

`iter_trained_tensors` gives the same merge one tensor at a time under the trained model's names (InternLM2's
wqkv as q / k / v), for writers of other formats (export/to_gguf.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.errors import TunesmithError
from tunesmith.export.adapter import Adapter, read_adapter
from tunesmith.export.folder import (
    check_destination,
    check_free_space,
    copy_side_files,
    copy_tokenizer_files,
    has_tokenizer,
    set_config_dtype,
    write_generation_config_if_missing,
    write_json,
)
from tunesmith.export.layout import Layout, layout_for
from tunesmith.export.shards import (
    Entry,
    ShardWriter,
    TensorRef,
    byte_progress,
    list_tensors,
    nbytes_of,
    parse_size,
    plan_shards,
    release,
)
from tunesmith.files import atomic_path

HEAD = "lm_head.weight"
EMBED = "model.embed_tokens.weight"
_QUANT_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".SCB", ".qweight", ".scales",
                   ".qzeros", ".g_idx")


@dataclass
class MergeResult:
    save_dir: Path
    shards: list[str]
    lora_modules: int
    replaced_tensors: int
    total_bytes: int
    device: str
    seconds: float


def pick_device(device: str) -> torch.device:
    device = (device or "auto").lower()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TunesmithError(f"--device {device}: no CUDA GPU is available", "use --device cpu or auto")
        return torch.device(device)
    if device == "cpu":
        return torch.device("cpu")
    raise TunesmithError(f"unknown --device {device!r}", "use cpu, cuda or auto")


def output_dtype(dtype: str | None) -> torch.dtype | None:
    """None = keep each tensor's dtype ('auto')."""
    if dtype is None or str(dtype).lower() == "auto":
        return None
    from tunesmith.models.quantize import pick_dtype

    return pick_dtype(dtype)


def check_full_precision(base: Path, config: dict, refs: list[TensorRef]) -> None:
    quant = config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?")
        bits = "4-bit" if quant.get("load_in_4bit") else "8-bit" if quant.get("load_in_8bit") else ""
        what = f"{method} {bits}".strip()
        raise TunesmithError(
            f"base model {base} is quantized ({what}): a LoRA delta added to quantized weights is rounded away",
            "merge into the full-precision (fp16 / bf16 / fp32) model; a QLoRA adapter was trained on the "
            "original model quantized at load time, so pass that original folder",
        )
    odd = [r.name for r in refs if r.name.endswith(_QUANT_SUFFIXES)]
    if odd:
        raise TunesmithError(f"base model {base} holds quantized tensors (e.g. {odd[0]})",
                             "merge into the full-precision (fp16 / bf16 / fp32) model")


def _mismatch_error(adapter: Adapter, base: Path, missing: list[str]) -> TunesmithError:
    shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
    trained_on = adapter.base_model_name_or_path
    hint = "merge into the model the adapter was trained on"
    if trained_on:
        hint += f" (adapter_config.json says base_model_name_or_path: {trained_on})"
    return TunesmithError(
        f"adapter {adapter.folder} does not match base model {base}: {len(missing)} adapted tensors are missing "
        f"from the base: {shown}", hint)


@dataclass
class MergePlan:
    refs: list[TensorRef]
    parts: list[list[tuple[str, tuple[int, ...]]]]  # per base tensor: trained-model names and shapes
    extras: list[tuple[str, str]]  # (base-layout name, trained name) of tensors the base does not store
    untie: bool


def plan_merge(base: Path, adapter: Adapter, refs: list[TensorRef], layout: Layout) -> MergePlan:
    """Which trained-model tensors each base tensor holds, and the tensors the base lacks (an untied head);
    TunesmithError when the adapter does not fit the base."""
    parts = [layout.trained_names(r.name, r.shape) for r in refs]
    shapes = {n: s for ps in parts for n, s in ps}
    extras: list[tuple[str, str]] = []
    untie = False
    head_replaced = HEAD in adapter.updates and adapter.updates[HEAD].replace is not None
    if HEAD not in shapes and EMBED in shapes:  # tied embeddings: the base stores the head as the embedding
        embed_changed = EMBED in adapter.updates  # a trained copy (modules_to_save) or a LoRA on it
        if head_replaced and not adapter.updates[HEAD].deltas:
            extras.append((layout.base_name(HEAD), HEAD))
            untie = True
        elif embed_changed and not adapter.config.get("ensure_weight_tying"):
            # peft changed only the embedding; the head kept computing with the original weight: write both
            extras.append((layout.base_name(HEAD), EMBED + "@original"))
            untie = True
        if untie:
            shapes[HEAD] = shapes[EMBED]
    missing = sorted(n for n in adapter.updates if n not in shapes)
    if missing:
        raise _mismatch_error(adapter, base, missing)
    for name, upd in adapter.updates.items():
        want = tuple(shapes[name])
        if upd.replace is not None and tuple(upd.replace.shape) != want:
            raise TunesmithError(
                f"adapter {adapter.folder}: {name} has shape {tuple(upd.replace.shape)}, the base model's is {want}",
                "merge into the model the adapter was trained on (same size and vocabulary)")
        for d in upd.deltas:
            got = (d.b.shape[0], d.a.shape[1])
            if d.embedding or d.fan_in_fan_out:
                got = got[::-1]
            if got != want:
                raise TunesmithError(
                    f"adapter {adapter.folder}: the LoRA of {name.rsplit('.', 1)[0]} makes a {got} delta, "
                    f"the base weight is {want}",
                    "merge into the model the adapter was trained on (same size)")
    return MergePlan(refs, parts, extras, untie)


def merge_parts(adapter: Adapter, names: list[str], pieces: list[torch.Tensor], device: torch.device,
                dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """The parts of one base tensor (trained-model `names`) with the adapter's updates applied, on the CPU in fp32;
    a lone updated part is cast to `dtype` (when given) on the device first: half the bytes to copy back."""
    new = []
    for n, piece in zip(names, pieces):
        upd = adapter.updates.get(n)
        if upd is None:
            new.append(piece.to(torch.float32))
            continue
        merged = upd.apply(piece, device, owned=len(pieces) == 1)
        if len(pieces) == 1 and dtype is not None:
            merged = merged.to(dtype)
        new.append(merged.cpu())
    return new


def extra_value(adapter: Adapter, layout: Layout, embed_ref: TensorRef, trained: str) -> torch.Tensor:
    """A tensor the plan adds that the base does not store: the trained head, or the original embedding
    (`EMBED@original`) kept as the head when only the embedding was trained."""
    if trained == EMBED + "@original":
        return layout.split(embed_ref.name, embed_ref.load())[0]
    return adapter.updates[trained].replace


def iter_trained_tensors(refs: list[TensorRef], layout: Layout, *, adapter: Adapter | None = None,
                         plan: MergePlan | None = None, device: torch.device | None = None,
                         ) -> Iterator[tuple[str, torch.Tensor]]:
    """(trained-model name, tensor) of every tensor of the (merged) model, one base tensor at a time in the base's
    order, then the tensors the plan adds (an untied head). Parts the adapter does not touch keep their dtype;
    updated ones are fp32. InternLM2's fused wqkv comes out as its q / k / v parts. `plan` is plan_merge's for
    `adapter`; without an adapter the base's own tensors come out under their trained-model names."""
    device = device or torch.device("cpu")
    current_file = None
    embed_ref = None
    try:
        for ref in refs:
            if ref.file != current_file:  # free the previous .bin shard's map
                release(r for r in refs if r.file == current_file)
                current_file = ref.file
            names = [n for n, _ in layout.trained_names(ref.name, ref.shape)]
            if EMBED in names:
                embed_ref = ref
            if not names:
                continue
            pieces = layout.split(ref.name, ref.load())
            if adapter is not None and any(n in adapter.updates for n in names):
                pieces = merge_parts(adapter, names, pieces, device)
            yield from zip(names, pieces)
            del pieces
        release(refs)
        if adapter is not None and plan is not None:
            for _base_name, trained in plan.extras:  # both kinds of extra are the (untied) head
                yield HEAD, extra_value(adapter, layout, embed_ref, trained)
    finally:
        release(refs)


def merge_adapter(
    base: str | Path,
    adapter: str | Path,
    save_dir: str | Path,
    *,
    max_shard_size: str | int = "2GB",
    device: str = "auto",
    dtype: str | None = "auto",
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> MergeResult:
    """Merge the LoRA adapter folder `adapter` into the model `base` and write a complete model to `save_dir`.

    `progress(done_bytes, total_bytes)` is called as output is written.
    """
    from tunesmith.models.resolve import read_config, resolve_model_path, weight_files

    start = time.perf_counter()
    max_bytes = parse_size(max_shard_size)
    dev = pick_device(device)
    out_dtype = output_dtype(dtype)
    adapter_dir = Path(adapter)
    if adapter_dir.is_dir() and not (adapter_dir / "adapter_config.json").is_file() \
            and (Path(str(base)) / "adapter_config.json").is_file():
        raise TunesmithError(f"{base} is the adapter and {adapter} is not",
                             "the order is: convert merge BASE ADAPTER SAVE_DIR")
    base_dir = resolve_model_path(base)
    config = read_config(base_dir)
    adapter_obj = read_adapter(adapter_dir)
    save_dir = Path(save_dir)
    check_destination(save_dir, overwrite=overwrite, sources=[base_dir, adapter_dir])

    refs = list_tensors(weight_files(base_dir))
    check_full_precision(base_dir, config, refs)
    layout = layout_for(config)
    plan = plan_merge(base_dir, adapter_obj, refs, layout)

    def out_type(dt: torch.dtype) -> torch.dtype:
        return out_dtype if out_dtype is not None and dt.is_floating_point else dt

    entries: list[Entry] = [(r.name, out_type(r.dtype), r.shape) for r in refs]
    embed_ref = None
    for base_name, _trained in plan.extras:
        src = next(r for r, ps in zip(refs, plan.parts) if any(n == EMBED for n, _ in ps))
        embed_ref = src
        entries.append((base_name, out_type(src.dtype), src.shape))
    shard_plan = plan_shards(entries, max_bytes)
    total = sum(nbytes_of(dt, shape) for _, dt, shape in entries)
    check_free_space(save_dir, total)

    on_bytes = byte_progress(total, progress)

    with atomic_path(save_dir, is_dir=True) as tmp:
        writer = ShardWriter(tmp, shard_plan, safe=True, on_bytes=on_bytes)
        try:
            current_file = None
            for ref, parts, entry in zip(refs, plan.parts, entries):
                if ref.file != current_file:  # free the previous .bin shard's map
                    release(r for r in refs if r.file == current_file)
                    current_file = ref.file
                names = [n for n, _ in parts]
                if not any(n in adapter_obj.updates for n in names):
                    writer.write(ref.name, ref.load().to(entry[1]))
                    continue
                tensor = ref.load()
                pieces = layout.split(ref.name, tensor)
                new = merge_parts(adapter_obj, names, pieces, dev, entry[1])
                del tensor, pieces
                writer.write(ref.name, layout.join(ref.name, new).to(entry[1]))
                del new
            release(refs)
            for (base_name, trained), entry in zip(plan.extras, entries[len(refs):]):
                writer.write(base_name, extra_value(adapter_obj, layout, embed_ref, trained).to(entry[1]))
            writer.finish()
        finally:
            writer.abort()
            release(refs)

        copy_side_files(base_dir, tmp, skip_tokenizer=has_tokenizer(adapter_dir))
        if has_tokenizer(adapter_dir):
            copy_tokenizer_files(adapter_dir, tmp)
        new_config = set_config_dtype(dict(config), out_dtype)
        new_config.pop("quantization_config", None)
        if plan.untie:
            new_config["tie_word_embeddings"] = False
        write_json(tmp / "config.json", new_config)
        write_generation_config_if_missing(tmp, config)

    return MergeResult(save_dir, writer.names, len(adapter_obj.lora_modules), len(adapter_obj.replaced), total,
                       str(dev), time.perf_counter() - start)
