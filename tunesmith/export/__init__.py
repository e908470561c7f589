"""Export: training checkpoints to Hugging Face folders, streaming LoRA merges, one-tensor-per-shard splits.

    from tunesmith.export import pth_to_hf, merge_adapter, split_checkpoint
    pth_to_hf("my.yaml", "work_dirs/my/epoch_3.pth", "hf")                # PEFT adapter (+ tokenizer, template)
    merge_adapter("./internlm-chat-7b", "hf", "merged", max_shard_size="2GB")   # shard by shard, low memory
    split_checkpoint("merged", "merged-split")                           # one shard per tensor

Modules: pth_to_hf.py, merge.py (streaming merge), adapter.py (PEFT adapter -> per-tensor updates),
layout.py (InternLM layouts), shards.py (safetensors / .bin reading, streaming sharded writing, sizes),
folder.py (destination checks, side files), split.py.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "pth_to_hf": "tunesmith.export.pth_to_hf",
    "PthToHfResult": "tunesmith.export.pth_to_hf",
    "merge_adapter": "tunesmith.export.merge",
    "MergeResult": "tunesmith.export.merge",
    "split_checkpoint": "tunesmith.export.split",
    "SplitResult": "tunesmith.export.split",
    "parse_size": "tunesmith.export.shards",
    "read_adapter": "tunesmith.export.adapter",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:  # lazy: importing tunesmith.export must not import torch
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tunesmith.export' has no attribute {name!r}")
