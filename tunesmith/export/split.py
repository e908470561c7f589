"""`convert split SRC DST`: rewrite a model folder with one shard per tensor (as XTuner's split).

Works on safetensors and .bin folders (the output keeps the input's format), reads one tensor at a time on
the CPU (no GPU needed), copies every other file and writes the index.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.export.folder import check_destination, check_free_space, copy_side_files
from tunesmith.export.shards import ShardWriter, byte_progress, list_tensors, release
from tunesmith.files import atomic_path


@dataclass
class SplitResult:
    save_dir: Path
    shards: int
    total_bytes: int
    safe: bool


def split_checkpoint(src: str | Path, dst: str | Path, *, overwrite: bool = False,
                     progress: Callable[[int, int], None] | None = None) -> SplitResult:
    from tunesmith.models.resolve import weight_files

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise TunesmithError(f"model folder {src} does not exist", "pass a Hugging Face model folder as SRC")
    files = weight_files(src)
    if not files:
        raise TunesmithError(f"{src} has no model weights (model*.safetensors or pytorch_model*.bin)",
                             "pass a Hugging Face model folder as SRC")
    safe = files[0].suffix == ".safetensors"
    check_destination(dst, overwrite=overwrite, sources=[src])
    refs = list_tensors(files)
    if not refs:
        raise TunesmithError(f"{src}: the weight files hold no tensors")
    total = sum(r.nbytes for r in refs)
    check_free_space(dst, total)
    on_bytes = byte_progress(total, progress)

    with atomic_path(dst, is_dir=True) as tmp:
        writer = ShardWriter(tmp, [[(r.name, r.dtype, r.shape)] for r in refs], safe=safe, on_bytes=on_bytes)
        try:
            current = None
            for ref in refs:
                if ref.file != current:
                    release(r for r in refs if r.file == current)
                    current = ref.file
                writer.write(ref.name, ref.load())
            writer.finish()
        finally:
            writer.abort()
            release(refs)
        copy_side_files(src, tmp)
    return SplitResult(dst, len(refs), total, safe)
