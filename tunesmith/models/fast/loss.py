"""Causal-LM cross-entropy without materialising the full ``[tokens, vocab]`` logits.

The training loop runs the decoder (not the LM head), then calls :func:`causal_lm_loss_sum` with the final
hidden states. The loss is a *sum* over target tokens plus the number of those tokens, so the loop can
normalise by the token count of the whole accumulation window (token-weighted loss, as SPEC §3 asks).

How the memory goes away:

1. the shift happens on the hidden states, and positions whose target is ``ignore_index`` are dropped
   *before* the head matmul (prompt tokens, padding and packed-sample boundaries cost nothing);
2. the remaining rows go through the head in chunks; each chunk's logits live only inside
   :class:`_ChunkedLinearCrossEntropy`'s forward, which computes the chunk's loss *and* its gradients
   (softmax minus one-hot, times the head weight) right away, so backward is a multiply and no chunk's
   logits are kept or recomputed;
3. on CUDA with liger-kernel installed, liger's fused linear cross-entropy Triton kernel does the same
   thing (used when ``use_liger`` is true).

Exactness against ``nn.CrossEntropyLoss(reduction="sum")`` on full logits: tests/models/fast/test_loss.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.models.fast.attention import packing_kwargs, runs_packed_attention

IGNORE_INDEX = -100

# A chunk's fp32 logits stay under this many bytes (liger picks a similar budget).
_CHUNK_BYTES = 256 * 1024 * 1024


def auto_chunk_size(vocab_size: int) -> int:
    """Rows per chunk so one chunk of fp32 logits stays near 256 MiB: 512 at a 103k vocabulary, 2048 at 32k."""
    rows = max(1, _CHUNK_BYTES // (4 * max(1, vocab_size)))
    return int(min(4096, max(128, 2 ** int(math.log2(rows)))))


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W.T + b, t_i) over rows, gradients computed chunk by chunk in the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):  # noqa: D401 - autograd signature
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        # accumulated in the weight's own dtype with addmm_ (fp32 accumulation inside each matmul)
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        with torch.autocast(device_type=hidden.device.type, enabled=False):  # dtypes are chosen here
            _chunk_loop(hidden, weight, bias, targets, chunk_size, loss, grad_h, grad_w, grad_b)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(
            grad_h if need_h else None,
            grad_w if need_w else None,
            grad_b if need_b else None,
        )
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_loss.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = grad_w * grad_loss.to(grad_w.dtype)
        if grad_b is not None:
            grad_b = (grad_b * grad_loss).to(ctx.bias_dtype)
        return grad_h, grad_w, grad_b, None, None


def _chunk_loop(hidden, weight, bias, targets, chunk_size, loss, grad_h, grad_w, grad_b) -> None:
    """Loss (accumulated into ``loss``) and gradients of each chunk, written into the given buffers."""
    need = grad_h is not None or grad_w is not None or grad_b is not None
    for start in range(0, hidden.shape[0], chunk_size):
        h = hidden[start : start + chunk_size]
        t = targets[start : start + chunk_size]
        logits = F.linear(h, weight, bias).float()
        lse = torch.logsumexp(logits, dim=-1)
        loss += (lse - logits.gather(1, t.unsqueeze(1)).squeeze(1)).sum()
        if need:
            # d loss / d logits = softmax - onehot, built in place in the fp32 logits buffer
            probs = logits.sub_(lse.unsqueeze(1)).exp_()
            probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            g = probs.to(hidden.dtype)
            del logits, probs
            if grad_h is not None:
                torch.matmul(g, weight, out=grad_h[start : start + chunk_size])
            if grad_w is not None:
                grad_w.addmm_(g.t(), h)
            if grad_b is not None:
                grad_b += g.float().sum(0)


def liger_available() -> bool:
    """True when liger-kernel's fused linear cross-entropy can run here (CUDA + the package)."""
    if not torch.cuda.is_available():
        return False
    try:
        from liger_kernel.transformers.functional import (
            liger_fused_linear_cross_entropy,  # noqa: F401
        )
    except Exception:  # noqa: BLE001 - ImportError, or triton missing/broken
        return False
    return True


def shifted_targets(
    labels: torch.Tensor, position_ids: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Targets for hidden positions ``0 .. L-2``: ``labels[:, 1:]``; a target that starts a new packed sample
    (its position id is 0) is ignored even if the data forgot to mask it, so no sample predicts the next one."""
    targets = labels[:, 1:]
    if position_ids is not None:
        starts = position_ids.expand_as(labels)[:, 1:] == 0
        targets = targets.masked_fill(starts, ignore_index)
    return targets


def causal_lm_loss_sum(
    hidden_states: torch.Tensor,
    lm_head: nn.Module | torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    position_ids: torch.Tensor | None = None,
    use_liger: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted cross-entropy summed over target tokens, and the number of those tokens.

    hidden_states: ``[B, L, H]`` final hidden states (after the final norm), as the decoder returns them.
    lm_head: the output ``nn.Linear`` (or its weight tensor); any other module (a peft wrapper around the head,
        say) works too, through per-chunk activation checkpointing instead of the fused path.
    labels: ``[B, L]`` unshifted labels with ``ignore_index`` where no loss is taken.
    chunk_size: rows of logits per chunk (default: :func:`auto_chunk_size` of the vocabulary).
    position_ids: optional ``[B, L]``; targets that open a packed sample are ignored.
    use_liger: ``None`` = liger's fused kernel when available on CUDA; ``True`` = require it; ``False`` = ours.

    Returns ``(loss_sum, n_tokens)``: fp32 scalar with grad, and an int64 scalar tensor. Divide by the token
    count of the whole accumulation window (not per micro-batch) before ``backward``.
    """
    targets = shifted_targets(labels, position_ids, ignore_index).reshape(-1)
    hidden = hidden_states[:, :-1, :].reshape(-1, hidden_states.shape[-1])
    keep = (targets != ignore_index).nonzero().squeeze(1)
    n_tokens = keep.new_tensor(keep.numel(), dtype=torch.long)
    if keep.numel() == 0:
        # keep the graph connected so backward() works on an all-ignored micro-batch
        return hidden_states.sum() * 0.0, n_tokens
    hidden = hidden.index_select(0, keep)
    targets = targets.index_select(0, keep)

    if isinstance(lm_head, torch.Tensor):
        weight, bias = lm_head, None
    elif type(lm_head) is nn.Linear and not is_partitioned(lm_head.weight):
        weight, bias = lm_head.weight, lm_head.bias
    else:  # a wrapped head, or one DeepSpeed ZeRO-3 gathers only inside its own forward
        return _generic_chunked(hidden, lm_head, targets, chunk_size or 512), n_tokens

    if use_liger is None:
        use_liger = hidden.is_cuda and liger_available()
    if use_liger:
        from tunesmith.errors import TunesmithError

        if not (hidden.is_cuda and liger_available()):
            raise TunesmithError(
                "liger-kernel's fused linear cross-entropy needs CUDA and the liger-kernel package",
                hint="pip install liger-kernel, or set speed.liger_kernel off",
            )
        from liger_kernel.transformers.functional import (
            liger_fused_linear_cross_entropy,
        )

        loss = liger_fused_linear_cross_entropy(
            hidden, weight, targets, bias, ignore_index=ignore_index, reduction="sum"
        )
        return loss.float(), n_tokens

    size = chunk_size or auto_chunk_size(weight.shape[0])
    loss = _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, size)
    return loss, n_tokens


def is_partitioned(weight: torch.Tensor) -> bool:
    """DeepSpeed ZeRO-3 keeps a placeholder outside the module's forward (``ds_id`` set, no elements)."""
    return hasattr(weight, "ds_id") or weight.numel() == 0


def _generic_chunked(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Any head module: per-chunk checkpointing, so only one chunk's logits exist at a time (also in backward)."""
    from torch.utils.checkpoint import checkpoint

    def chunk_loss(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h).float(), t, reduction="sum")

    total = None
    for start in range(0, hidden.shape[0], chunk_size):
        part = checkpoint(
            chunk_loss, hidden[start : start + chunk_size], targets[start : start + chunk_size], use_reentrant=False
        )
        total = part if total is None else total + part
    return total


def split_decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder stack (returns final hidden states) and the LM head of a (peft-wrapped) causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def decoder_inputs(decoder: nn.Module, batch: dict) -> dict:
    """The decoder's keyword arguments for a batch of the data contract: ``input_ids``, ``position_ids`` and
    ``attention_mask`` where given, no cache, and under packed attention the sample boundaries (found once here,
    not in every layer)."""
    kwargs = {"input_ids": batch["input_ids"], "use_cache": False}
    for key in ("position_ids", "attention_mask"):
        if batch.get(key) is not None:
            kwargs[key] = batch[key]
    if runs_packed_attention(decoder):
        kwargs.update(packing_kwargs(batch))
    return kwargs


def model_loss_sum(
    model: nn.Module,
    batch: dict,
    *,
    chunked: bool = True,
    use_liger: bool | None = None,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch's ``(loss_sum, n_tokens)`` for a causal LM and a batch dict of the data contract
    (``input_ids``, ``labels``, optional ``position_ids`` and ``attention_mask``).

    ``chunked=False`` is the plain path (full logits through the model's head, then one cross-entropy);
    both give the same numbers.
    """
    labels = batch["labels"]
    decoder, head = split_decoder_and_head(model)
    hidden = decoder(**decoder_inputs(decoder, batch)).last_hidden_state
    if chunked:
        return causal_lm_loss_sum(
            hidden,
            head,
            labels,
            chunk_size=chunk_size,
            ignore_index=ignore_index,
            position_ids=batch.get("position_ids"),
            use_liger=use_liger,
        )
    logits = head(hidden)[:, :-1].float()
    targets = shifted_targets(labels, batch.get("position_ids"), ignore_index)
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )
    return loss, (targets != ignore_index).sum()
