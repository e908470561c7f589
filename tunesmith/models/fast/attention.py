"""Contamination-free attention over packed samples, without flash-attn.

A packed row holds several samples; ``position_ids`` restart at 0 for each one (docs/internals.md). Attention
must never cross a sample boundary. transformers v5's plain ``sdpa`` path already honours that: it detects the
packing from ``position_ids`` and builds a dense ``[B, 1, L, L]`` block-diagonal causal mask, which sends SDPA to
its masked (memory-efficient) kernel and computes every block, including the ones the mask throws away.

The fast path registers one more attention function in transformers' ``AttentionInterface`` (the supported
extension point; nothing is patched): :data:`PACKED_SDPA` runs plain causal SDPA once per sample
(``is_causal=True`` and no mask, so SDPA picks its flash kernel) and concatenates the results. Work per row is
the sum of the samples' squared lengths instead of the row's squared length. The sample boundaries are read from
``position_ids`` once per forward pass (cached on the tensor) and reused by every layer. Rows that hold one
sample, and batches without ``position_ids``, fall through to transformers' own ``sdpa`` function with the mask
transformers built, so padding masks keep working.

``speed.packed_attention`` switches it; exactness against the plain path is in tests/models/test_fast_paths.py.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

PACKED_SDPA = "tunesmith_packed_sdpa"

_registered = False
# one-entry cache: the same position_ids tensor is handed to every layer of one forward pass. A weak
# reference, so a later batch that reuses the freed memory can never hit a stale entry.
_segments_cache: tuple[weakref.ref, int, list[list[tuple[int, int]]] | None] | None = None


def segments_from_position_ids(position_ids: torch.Tensor) -> list[list[tuple[int, int]]] | None:
    """Per row, the ``(start, end)`` spans of the packed samples; ``None`` when no row is packed.

    A new sample starts wherever the position does not follow the previous one by exactly 1 (the rule
    transformers uses for its packed mask, so both paths agree on the boundaries).
    """
    global _segments_cache
    version = position_ids._version
    if _segments_cache is not None and _segments_cache[0]() is position_ids and _segments_cache[1] == version:
        return _segments_cache[2]
    pos = position_ids if position_ids.dim() == 2 else position_ids.view(1, -1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = (pos[:, 1:] - pos[:, :-1]) != 1
    length = pos.shape[1]
    rows = []
    packed = False
    for row in starts.cpu().tolist():  # one host sync per forward pass
        idx = [i for i, s in enumerate(row) if s]
        spans = [(a, b) for a, b in zip(idx, idx[1:] + [length])]
        packed = packed or len(spans) > 1
        rows.append(spans)
    result = rows if packed else None
    _segments_cache = (weakref.ref(position_ids), version, result)
    return result


@torch.compiler.disable  # host-side segment list: keep it out of compiled graphs (no per-batch recompiles)
def packed_sdpa_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-function signature: q ``[B, Hq, L, D]``, k/v ``[B, Hkv, L, D]`` ->
    ``([B, L, Hq, D], None)``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    segments = None
    if position_ids is not None and causal and query.shape[2] == key.shape[2] == position_ids.shape[-1]:
        segments = segments_from_position_ids(position_ids)
    if segments is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )

    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    rows = []
    for b, spans in enumerate(segments):
        parts = [
            F.scaled_dot_product_attention(
                query[b : b + 1, :, s:e],
                key[b : b + 1, :, s:e],
                value[b : b + 1, :, s:e],
                dropout_p=dropout,
                is_causal=True,
                scale=scaling,
            )
            for s, e in spans
        ]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None


def register_packed_attention() -> str:
    """Register :data:`PACKED_SDPA` with transformers (attention function + sdpa's mask builder). Idempotent."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention_forward)
        AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
        _registered = True
    return PACKED_SDPA


def set_attention(model: nn.Module, implementation: str) -> None:
    """Switch a loaded transformers model (or a peft wrapper around one) to an attention implementation."""
    if implementation == PACKED_SDPA:
        register_packed_attention()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        base.set_attn_implementation(implementation)
    except Exception:  # older / newer transformers without the method or with stricter checks
        for m in [base, *base.modules()]:
            cfg = getattr(m, "config", None)
            if cfg is not None and hasattr(cfg, "_attn_implementation"):
                cfg._attn_implementation = implementation


def apply_packed_attention(model: nn.Module, enabled: bool = True) -> nn.Module:
    """The ``speed.packed_attention`` fast path: use :data:`PACKED_SDPA` where the model runs ``sdpa``.

    Models on eager / flash / flex attention are left alone (flash-attn's varlen path is already packed-aware
    in transformers; eager is what a user asks for when debugging).
    """
    if not enabled:
        return model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    current = getattr(getattr(base, "config", None), "_attn_implementation", None)
    if current in ("sdpa", None):
        set_attention(model, PACKED_SDPA)
    return model
