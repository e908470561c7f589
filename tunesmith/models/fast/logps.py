"""Per-sequence log-probabilities for preference tuning, without materialising the full ``[tokens, vocab]`` logits.

DPO and ORPO score a whole answer: the sum over its tokens of ``log p(token | everything before)``. As for the SFT
loss (loss.py), the decoder runs once, targets that carry no score (prompt, padding, sequence starts) are dropped
before the head, and the head runs in chunks. The difference: the loss is not known when a chunk is done (it
depends on the whole sequence's sum, and DPO's weight on that sum is only known once every sequence is scored),
so :class:`_ChunkedTokenLogProbs` keeps the hidden rows and recomputes each chunk's logits in backward, where the
per-token weights have arrived. One extra head matmul per chunk instead of ``[tokens, vocab]`` fp32 logits.

``sequence_logps(model, batch)`` -> ``(logps [S], tokens [S])`` for the ``S`` sequences of a pair batch
(``batch["sequence_ids"]``, data/pack.py); ``chunked=False`` is the plain path (full logits, ``log_softmax``),
which tests/models/fast/test_logps.py compares it with. ``score_pairs(model, samples)`` scores encoded pairs one
pair a row without gradients: DPO's precomputed reference (train/reference.py) and ``tunesmith eval`` on pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.models.fast.attention import runs_packed_attention
from tunesmith.models.fast.loss import (
    IGNORE_INDEX,
    auto_chunk_size,
    decoder_inputs,
    is_partitioned,
    shifted_targets,
    split_decoder_and_head,
)


class _ChunkedTokenLogProbs(torch.autograd.Function):
    """``log_softmax(h_i @ W.T + b)[t_i]`` for every row, in chunks; logits recomputed chunk by chunk in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):  # noqa: D401 - autograd signature
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        with torch.no_grad(), torch.autocast(device_type=hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                stop = start + chunk_size
                logits = F.linear(hidden[start:stop], weight, bias).float()
                picked = logits.gather(1, targets[start:stop].unsqueeze(1)).squeeze(1)
                out[start:stop] = picked - torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        size = ctx.chunk_size
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], size):
                stop = start + size
                h = hidden[start:stop]
                t = targets[start:stop]
                # d logp / d logits = onehot - softmax, times each row's incoming gradient
                probs = torch.softmax(F.linear(h, weight, bias).float(), dim=-1)
                probs.neg_()
                probs[torch.arange(t.shape[0], device=t.device), t] += 1.0
                g = (probs * grad_out[start:stop].unsqueeze(1)).to(hidden.dtype)
                del probs
                if grad_h is not None:
                    torch.matmul(g, weight, out=grad_h[start:stop])
                if grad_w is not None:
                    grad_w.addmm_(g.t(), h)
                if grad_b is not None:
                    grad_b += g.float().sum(0)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None


def token_logps(hidden: torch.Tensor, lm_head: nn.Module | torch.Tensor, targets: torch.Tensor, *,
                chunk_size: int | None = None) -> torch.Tensor:
    """fp32 log-probability of each target for rows of final hidden states ``[N, H]`` (chunked, see above); any
    head that is not a plain ``nn.Linear`` (a peft wrapper, a ZeRO-3 placeholder) goes through its own forward,
    one checkpointed chunk at a time."""
    if isinstance(lm_head, torch.Tensor):
        weight, bias = lm_head, None
    elif type(lm_head) is nn.Linear and not is_partitioned(lm_head.weight):
        weight, bias = lm_head.weight, lm_head.bias
    else:
        return _generic_token_logps(hidden, lm_head, targets, chunk_size or 512)
    size = chunk_size or auto_chunk_size(weight.shape[0])
    return _ChunkedTokenLogProbs.apply(hidden, weight, bias, targets, size)


def _generic_token_logps(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, size: int) -> torch.Tensor:
    from torch.utils.checkpoint import checkpoint

    def chunk(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(head(h).float(), dim=-1).gather(1, t.unsqueeze(1)).squeeze(1)

    parts = [checkpoint(chunk, hidden[s:s + size], targets[s:s + size], use_reentrant=False)
             for s in range(0, hidden.shape[0], size)]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def sequence_logps(model: nn.Module, batch: dict, *, chunked: bool = True, chunk_size: int | None = None,
                   ignore_index: int = IGNORE_INDEX, **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of the scored tokens of each sequence of a pair batch, and how many there are.

    Returns ``(logps, tokens)``: fp32 ``[S]`` (with grad when the model has trainable parameters) and int64 ``[S]``,
    ``S = 2 * batch["num_pairs"]``, in ``sequence_ids`` order (chosen, rejected, chosen, ...). Extra keyword
    options of the SFT loss (``use_liger``) are accepted and have no effect here."""
    decoder, head = split_decoder_and_head(model)
    if batch.get("kv_index") is not None and not runs_packed_attention(decoder):
        raise TunesmithError("these pairs hold their shared prompt once, which only tunesmith's packed attention reads",
                             "set preference.share_prompt=false, or speed.packed_attention=true with "
                             "model.attn_implementation auto or sdpa")
    hidden_states = decoder(**decoder_inputs(decoder, batch)).last_hidden_state
    targets = shifted_targets(batch["labels"], batch.get("position_ids"), ignore_index).reshape(-1)
    owners = batch["sequence_ids"][:, 1:].reshape(-1)
    keep = (targets != ignore_index).nonzero().squeeze(1)
    hidden = hidden_states[:, :-1, :].reshape(-1, hidden_states.shape[-1]).index_select(0, keep)
    targets, owners = targets.index_select(0, keep), owners.index_select(0, keep)
    sequences = 2 * int(batch["num_pairs"])
    if chunked:
        per_token = token_logps(hidden, head, targets, chunk_size=chunk_size)
    else:
        per_token = torch.log_softmax(head(hidden).float(), dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
    logps = torch.zeros(sequences, dtype=torch.float32, device=per_token.device).index_add(0, owners, per_token)
    if keep.numel() == 0:
        logps = logps + hidden_states.sum() * 0.0  # keeps the graph connected for backward
    tokens = torch.bincount(owners, minlength=sequences)
    return logps, tokens


def score_pairs(model: nn.Module, samples: Sequence, *, batch_size: int = 8, pad_id: int = 0,
                device: torch.device | None = None, host_inputs: tuple[str, ...] = (),
                progress: Callable[[int], None] | None = None, **options) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-probability of the scored tokens of each of ``samples`` (encoded pairs: consecutive chosen /
    rejected, as ``data.pairs.encode_pairs`` gives them) and their token counts: float64 and int64 arrays
    ``[len(samples)]``, in order. ``batch_size`` pairs a forward, one pair a row, longest first; eval mode, no
    gradients (the caller adds autocast or an adapter switch around it). ``device``: where the batches go (default:
    the model's first parameter's), except ``host_inputs``; ``options`` go to :func:`sequence_logps`;
    ``progress(n)`` after each batch with its number of pairs."""
    from tunesmith.data.pack import collate, pair_dataset

    share = runs_packed_attention(split_decoder_and_head(model)[0])
    rows = pair_dataset(samples, max(len(s.input_ids) for s in samples), pack=False, seed=None,  # row k: pair k
                        share_prompt=share)
    order = sorted(range(len(rows)), key=lambda k: (-rows.lengths[k], k))
    logps = np.zeros(len(samples), dtype=np.float64)
    tokens = np.zeros(len(samples), dtype=np.int64)
    device = device if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                batch = collate([rows[k] for k in chunk], pad_id, True, pairs=True)
                batch = {k: v.to(device) if torch.is_tensor(v) and k not in host_inputs else v
                         for k, v in batch.items()}
                seq_logps, seq_tokens = sequence_logps(model, batch, **{"chunked": True, **options})
                where = np.array([i for k in chunk for i in (2 * k, 2 * k + 1)])  # batch sequence j -> sample
                logps[where] = seq_logps.double().cpu().numpy()
                tokens[where] = seq_tokens.cpu().numpy()
                if progress is not None:
                    progress(len(chunk))
    finally:
        if was_training:
            model.train()
    return logps, tokens
