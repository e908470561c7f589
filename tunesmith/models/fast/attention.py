"""Contamination-free attention over packed samples: one variable-length flash-attention call per layer.

A packed row holds several samples; ``position_ids`` restart at 0 for each one (docs/internals.md). Attention
must never cross a sample boundary. transformers v5's plain ``sdpa`` path already honours that: it detects the
packing from ``position_ids`` and builds a dense ``[B, 1, L, L]`` block-diagonal causal mask, which sends SDPA to
a masked kernel that computes every block, including the ones the mask throws away.

The fast path registers one more attention function in transformers' ``AttentionInterface`` (the supported
extension point; nothing is patched): :data:`PACKED_SDPA`. Per forward pass it reads the sample boundaries from
``position_ids`` once (one small device-to-host copy, cached on the tensor and reused by every layer and by the
activation-checkpointing recompute) and turns them into ``cu_seqlens`` (int32, on the device) over the flattened
``[B * L]`` tokens. Each layer then makes a single call of the variable-length causal flash-attention kernel over
the whole batch: no mask, no per-sample loop, no host sync. Work per row is the sum of the samples' squared
lengths instead of the row's squared length.

Backends, chosen per call (:func:`packed_backend`):

* ``varlen``: CUDA, fp16 / bf16, head dim a multiple of 8 up to 256, no attention dropout, compute capability
  >= 8.0: torch's flash-attention op ``aten::_flash_attention_forward`` with ``cum_seq_q`` / ``cum_seq_k``
  (differentiable through torch's own derivative, ``_flash_attention_backward``). It is the kernel that
  ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.9) runs as its flash backend; it is called directly
  because the public wrapper changed signature in every release (``is_causal=`` in 2.9, ``window_size=`` from
  2.10, ``enable_gqa=`` from 2.12) and some builds route it to cuDNN, which builds a new cuDNN graph for every
  new set of sample lengths (pytorch/pytorch#187770): ruinous when every packed batch is different. The op's
  presence and schema are checked once; if the call fails at run time the path logs one warning and falls back
  for the rest of the process (varlen.py holds the kernel and those checks).
* ``loop``: anywhere else (CPU, fp32, old torch): plain causal SDPA once per sample, results concatenated.
  Exact, but one SDPA call per sample per layer; on an H200 at 7B / 2048 tokens it measured 11 % slower than
  transformers' masked path, so it is only the fallback.
* rows that hold one sample each, and batches without ``position_ids``, fall through to transformers' own
  ``sdpa`` function with the mask transformers built, so padding masks keep working (the data contract only
  pads batches that are not packed).

``TUNESMITH_PACKED_ATTENTION=loop`` forces the loop (debugging, comparisons). ``speed.packed_attention``
switches the whole path; exactness against the plain path is in tests/models/fast/test_attention.py. Pair
batches whose shared prompt is held once take shared_prompt.py's path.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.models.fast.shared_prompt import shared_prompt_attention, shared_prompt_kwargs
from tunesmith.models.fast.varlen import (
    flash_forward_bhld,
    inputs_fit_varlen,
    varlen_failed,
    varlen_possible,
)

PACKED_SDPA = "tunesmith_packed_sdpa"

_registered = False


@dataclass(frozen=True)
class Packing:
    """Where the samples of a packed batch start and end.

    ``spans``: per row, the ``(start, end)`` of each sample; ``cu_seqlens``: int32 ``[N + 1]`` offsets of all
    ``N`` samples in the flattened ``[B * L]`` tokens, on the batch's device; ``max_len``: the longest sample.
    """

    spans: list[list[tuple[int, int]]]
    cu_seqlens: torch.Tensor
    max_len: int


# one-entry cache: the same position_ids tensor is handed to every layer of one forward pass (and again to the
# checkpointed layers' recompute). A weak reference, so a later batch that reuses the freed memory can never
# hit a stale entry; the tensor's version counter catches in-place edits.
_packing_cache: tuple[weakref.ref, int, int, Packing | None] | None = None


@torch.compiler.disable  # host-side bookkeeping: keep it out of compiled graphs
def packing_from_position_ids(position_ids: torch.Tensor, batch_size: int | None = None) -> Packing | None:
    """The :class:`Packing` of ``position_ids`` (``[B, L]`` or ``[L]``), or ``None`` when no row holds more
    than one sample. ``batch_size`` expands a ``[1, L]`` tensor shared by every row.

    A new sample starts wherever the position does not follow the previous one by exactly 1 (the rule
    transformers uses for its packed mask, so both paths agree on the boundaries). Costs one device-to-host copy
    of a ``[B, L]`` bool tensor per new ``position_ids`` tensor; every later call with it is a cache hit.
    """
    global _packing_cache
    from tunesmith.data.pack import sample_starts

    rows = batch_size or (position_ids.shape[0] if position_ids.dim() == 2 else 1)
    version = position_ids._version
    cached = _packing_cache
    if cached is not None and cached[0]() is position_ids and cached[1] == version and cached[2] == rows:
        return cached[3]
    starts = sample_starts(position_ids)
    if starts.shape[0] != rows:
        starts = starts.expand(rows, -1)
    host = _host_copy(starts)  # the one host sync per forward pass
    length = host.shape[1]
    first = host.reshape(-1).nonzero().squeeze(1)  # global start of every sample; each row starts one
    result = None
    if first.numel() > rows:
        bounds = torch.cat([first, first.new_tensor([rows * length])])
        spans: list[list[tuple[int, int]]] = [[] for _ in range(rows)]
        for a, b in itertools.pairwise(bounds.tolist()):
            r = a // length
            spans[r].append((a - r * length, b - r * length))
        result = Packing(
            spans=spans,
            cu_seqlens=bounds.to(torch.int32).to(position_ids.device),
            max_len=int((bounds[1:] - bounds[:-1]).max()),
        )
    _packing_cache = (weakref.ref(position_ids), version, rows, result)
    return result


def packing_kwargs(batch: dict) -> dict:
    """The keyword arguments that hand a packed batch's sample boundaries to every attention layer
    (transformers' names: ``cu_seq_lens_q`` / ``cu_seq_lens_k`` / ``max_length_q`` / ``max_length_k``), or ``{}``
    when no row holds more than one sample or the varlen kernel cannot run here. Read from the collator's
    ``cu_seq_lens`` when the batch has it (no device-to-host copy at all), else from ``position_ids`` once (one
    copy per batch). With these the layers' attention is one varlen kernel call that needs nothing from the host,
    which also keeps compiled decoder layers free of graph breaks.

    ``max_length`` is the row length, an upper bound the kernel accepts (blocks past a sample's end exit at
    once): one value for every batch, so compiled layers are not recompiled for each new longest sample."""
    position_ids = batch.get("position_ids")
    if position_ids is None or batch.get("attention_mask") is not None:
        return {}
    if batch.get("kv_index") is not None:
        return shared_prompt_kwargs(batch, position_ids)
    if not varlen_possible(position_ids.device):
        return {}
    rows = batch["input_ids"].shape[0]
    cu = batch.get("cu_seq_lens")
    if cu is None:
        packing = packing_from_position_ids(position_ids, rows)
        if packing is None:
            return {}
        cu = packing.cu_seqlens
    elif cu.numel() - 1 <= rows:  # one sample per row: plain causal attention
        return {}
    cu = cu.to(position_ids.device, non_blocking=True)
    torch._dynamo.maybe_mark_dynamic(cu, 0)  # the sample count changes from batch to batch
    length = position_ids.shape[-1]
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": length, "max_length_k": length}


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    return t.cpu()


def packed_backend(query: torch.Tensor, key: torch.Tensor, dropout: float = 0.0) -> str:
    """``"varlen"`` when the single-call flash kernel can run these inputs, else ``"loop"``."""
    if varlen_possible(query.device) and inputs_fit_varlen(query, key, dropout):
        return "varlen"
    return "loop"


def flash_varlen(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, packing: Packing, scale: float | None
) -> torch.Tensor:
    """Causal attention of every packed sample in one call. q ``[B, Hq, L, D]``, k / v ``[B, Hkv, L, D]``
    (grouped heads are handled by the kernel) -> ``[B, L, Hq, D]``."""
    return flash_forward_bhld(query, key, value, packing.cu_seqlens, packing.max_len, scale)


def loop_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    packing: Packing,
    scale: float | None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """The fallback: causal SDPA once per sample. Same shapes as :func:`flash_varlen`."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    rows = []
    for b, spans in enumerate(packing.spans):
        parts = [
            F.scaled_dot_product_attention(
                query[b : b + 1, :, s:e],
                key[b : b + 1, :, s:e],
                value[b : b + 1, :, s:e],
                dropout_p=dropout,
                is_causal=True,
                scale=scale,
            )
            for s, e in spans
        ]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous()


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

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    self_attention = query.shape[2] == key.shape[2]
    if kwargs.get("kv_index") is not None:  # shared prompts (data/pack.py): the segments are explicit
        return shared_prompt_attention(query, key, value, kwargs, scaling, dropout), None
    cu = kwargs.get("cu_seq_lens_q")
    if torch.compiler.is_compiling():
        # inside a compiled layer: no host-side bookkeeping and no try / except around the kernel. The varlen
        # kernel when the boundaries came in as arguments, else transformers' masked SDPA (its mask holds the
        # packing): exact either way
        # (packing_kwargs passes the boundaries only where varlen_possible: nothing host-side is asked here)
        if cu is not None and causal and self_attention and inputs_fit_varlen(query, key, dropout):
            return flash_forward_bhld(query, key, value, cu, kwargs["max_length_q"], scaling), None
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    position_ids = kwargs.get("position_ids")
    packing = None
    if causal and self_attention:
        if cu is not None and packed_backend(query, key, dropout) == "varlen":
            try:
                return flash_forward_bhld(query, key, value, cu, kwargs["max_length_q"], scaling), None
            except RuntimeError as exc:
                varlen_failed(exc)
        if position_ids is not None and query.shape[2] == position_ids.shape[-1]:
            packing = packing_from_position_ids(position_ids, query.shape[0])
    if packing is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    if packed_backend(query, key, dropout) == "varlen":
        try:
            return flash_varlen(query, key, value, packing, scaling), None
        except RuntimeError as exc:
            varlen_failed(exc)
    return loop_attention(query, key, value, packing, scaling, dropout), None


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


def runs_packed_attention(decoder: nn.Module) -> bool:
    """Whether ``decoder`` (a transformers model, not a peft wrapper) attends through :data:`PACKED_SDPA`."""
    return getattr(getattr(decoder, "config", None), "_attn_implementation", None) == PACKED_SDPA


def set_attention(model: nn.Module, implementation: str) -> None:
    """Switch a loaded transformers model (or a peft wrapper around one) to an attention implementation."""
    if implementation == PACKED_SDPA:
        register_packed_attention()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        base.set_attn_implementation(implementation)
    except Exception:  # noqa: BLE001 - older / newer transformers without the method or with stricter checks
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
