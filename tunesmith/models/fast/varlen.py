"""The variable-length causal flash-attention kernel that packed attention (attention.py) and shared prompts
(shared_prompt.py) run: whether it can run here, and the call.

It is torch's own flash-attention op ``aten::_flash_attention_forward`` with ``cum_seq_q`` / ``cum_seq_k``
(differentiable through torch's ``_flash_attention_backward``), called directly rather than through
``torch.nn.attention.varlen.varlen_attn`` for the reasons in attention.py's docstring. It runs on CUDA at compute
capability 8.0 or newer, in fp16 / bf16, with a head dimension that is a multiple of 8 up to 256 and no attention
dropout. The op's presence and schema are checked once (:func:`flash_varlen_available`); when a call fails at run
time, :func:`varlen_failed` logs one warning and every later call takes the fallback (the per-sample loop).
``TUNESMITH_PACKED_ATTENTION=loop`` forces the fallback.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

# "auto" (varlen where it can run, else the loop) or "loop"; read once, tests may set it
BACKEND = os.environ.get("TUNESMITH_PACKED_ATTENTION", "auto").strip().lower() or "auto"
_varlen_broken: str | None = None  # set when the varlen kernel failed once: the loop is used from then on

_FLASH_SCHEMA_ARGS = ("query", "key", "value", "cum_seq_q", "cum_seq_k", "max_q", "max_k", "dropout_p", "is_causal")
_flash_checked: bool | None = None
_capability_ok: dict[int, bool] = {}


def flash_varlen_available() -> bool:
    """True when this torch has the variable-length flash-attention op with the arguments used here."""
    global _flash_checked
    if _flash_checked is None:
        try:
            op = torch.ops.aten._flash_attention_forward.default
            names = [a.name for a in op._schema.arguments]
            _flash_checked = list(names[: len(_FLASH_SCHEMA_ARGS)]) == list(_FLASH_SCHEMA_ARGS) and "scale" in names
        except (AttributeError, RuntimeError):
            _flash_checked = False
    return _flash_checked


def _capability_supported(device: torch.device) -> bool:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _capability_ok:
        _capability_ok[index] = torch.cuda.get_device_capability(index) >= (8, 0)
    return _capability_ok[index]


def varlen_possible(device: torch.device) -> bool:
    """Whether the varlen kernel can run on ``device`` at all (CUDA, sm80+, the op present, not switched off or
    broken); what the inputs must also satisfy is :func:`inputs_fit_varlen`."""
    return (
        BACKEND != "loop"
        and _varlen_broken is None
        and device.type == "cuda"
        and flash_varlen_available()
        and _capability_supported(device)
    )


def inputs_fit_varlen(query: torch.Tensor, key: torch.Tensor, dropout: float) -> bool:
    head_dim = query.shape[-1]
    return (
        query.dtype in (torch.float16, torch.bfloat16)
        and key.dtype == query.dtype
        and head_dim % 8 == 0
        and head_dim <= 256
        and not dropout
    )


def flat_tokens(t: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, D]`` -> ``[B * L, H, D]``: a free view when it was transposed from ``[B, L, H, D]`` (HF does)."""
    b, h, length, d = t.shape
    return t.transpose(1, 2).reshape(b * length, h, d)


def flash_forward_bhld(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float | None,
    shared: dict | None = None,
) -> torch.Tensor:
    """Causal attention of every ``cu`` segment in one call: q ``[B, Hq, L, D]``, k / v ``[B, Hkv, L, D]`` (grouped
    heads handled by the kernel) -> ``[B, L, Hq, D]``. ``shared``: the kwargs of a batch with shared prompts (keys
    gathered segment by segment with ``kv_index``, their own offsets ``cu_seq_lens_k``)."""
    b, hq, length, _ = query.shape
    q, k, v = flat_tokens(query).contiguous(), flat_tokens(key), flat_tokens(value)
    cu_k, max_k = cu, max_len
    if shared is not None:
        k, v = k.index_select(0, shared["kv_index"]), v.index_select(0, shared["kv_index"])
        cu_k, max_k = shared["cu_seq_lens_k"], shared["max_length_k"]
    out = flash_forward(q, k.contiguous(), v.contiguous(), cu, cu_k, max_len, max_k, scale)
    return out.view(b, length, hq, out.shape[-1])


def flash_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int,
    max_k: int, scale: float | None
) -> torch.Tensor:
    """``[Tq, Hq, D]`` causal attention of each ``cu_q`` segment over the same ``cu_k`` segment of the keys (dropout
    0, no debug mask). Where a segment has more keys than queries the kernel aligns the causal mask to the bottom
    right: query i sees every key up to ``i + keys - queries``, the rejected rest seeing its whole shared prefix."""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False,
                                                   scale=scale)[0]


def varlen_failed(exc: RuntimeError) -> None:
    """A build without the kernel for this GPU / shape: fall back to the loop for the rest of the process."""
    global _varlen_broken
    _varlen_broken = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    log.warning("packed attention: the varlen flash kernel failed (%s); using per-sample SDPA", _varlen_broken)
