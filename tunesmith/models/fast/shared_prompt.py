"""Attention for pair batches that hold each pair's shared prompt once (``preference.share_prompt``).

data/pack.py lays a pair out as the prompt and chosen answer, then the rejected answer alone; the batch names each
segment's keys itself (``kv_index``: the prompt's positions followed by the rejected rest's, ``cu_seq_lens_k``:
their offsets). Each segment's queries attend causally over its own keys with the mask aligned to the bottom
right, so the rejected rest sees the whole shared prefix before it. The varlen kernel (varlen.py) does that in one
call over gathered keys; elsewhere (CPU, fp32, ...) SDPA runs once per segment. Exactness against the unshared
pair: tests/models/fast/test_logps.py.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from tunesmith.models.fast.varlen import (
    flash_forward_bhld,
    flat_tokens,
    inputs_fit_varlen,
    varlen_failed,
    varlen_possible,
)


def shared_prompt_kwargs(batch: dict, position_ids: torch.Tensor) -> dict:
    """A batch with shared prompts (data/pack.py) names each segment's keys itself; every path needs that (the
    block mask read from positions would be wrong), so it is passed on whatever the backend, with whether the varlen
    kernel may run (decided here, on the host, so compiled layers only read a flag)."""
    device = position_ids.device
    out = {name: batch[key].to(device, non_blocking=True)
           for name, key in (("cu_seq_lens_q", "cu_seq_lens"), ("cu_seq_lens_k", "cu_seq_lens_k"),
                             ("kv_index", "kv_index"))}
    for t in out.values():
        torch._dynamo.maybe_mark_dynamic(t, 0)
    length = position_ids.shape[-1]  # a bound on every query and key segment: a rejected rest and its prefix are
    # shorter than the row that also holds the chosen rest
    return {**out, "max_length_q": length, "max_length_k": length, "shared_varlen": varlen_possible(device)}


@torch.compiler.disable  # host-side segment lists: runs eagerly even inside a compiled layer
def shared_loop_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, shared: dict, scale: float | None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """The fallback for shared prompts (CPU, fp32, ...): SDPA once per segment over its gathered keys, with the
    bottom-right causal mask of ``varlen.flash_forward``. q ``[B, Hq, L, D]``, k / v ``[B, Hkv, L, D]`` ->
    ``[B, L, Hq, D]``."""
    b, hq, length, _ = query.shape
    groups = hq // key.shape[1]
    q = flat_tokens(query)
    index = shared["kv_index"]
    k, v = flat_tokens(key).index_select(0, index), flat_tokens(value).index_select(0, index)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    parts = []
    q_bounds, k_bounds = shared["cu_seq_lens_q"].tolist(), shared["cu_seq_lens_k"].tolist()
    for (q0, q1), (k0, k1) in zip(itertools.pairwise(q_bounds), itertools.pairwise(k_bounds)):
        nq, nk = q1 - q0, k1 - k0
        mask = None if nq == nk else torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
        out = F.scaled_dot_product_attention(q[q0:q1].transpose(0, 1), k[k0:k1].transpose(0, 1),
                                             v[k0:k1].transpose(0, 1), attn_mask=mask, dropout_p=dropout,
                                             is_causal=mask is None, scale=scale)
        parts.append(out.transpose(0, 1))
    return torch.cat(parts).view(b, length, hq, -1)


def shared_prompt_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, shared: dict, scale: float | None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Attention of a batch with shared prompts: the varlen kernel over gathered keys where it can run, else the
    per-segment loop."""
    if shared["shared_varlen"] and inputs_fit_varlen(query, key, dropout):
        args = (query, key, value, shared["cu_seq_lens_q"], shared["max_length_q"], scale, shared)
        if torch.compiler.is_compiling():  # no try / except inside a compiled graph
            return flash_forward_bhld(*args)
        try:
            return flash_forward_bhld(*args)
        except RuntimeError as exc:
            varlen_failed(exc)
    return shared_loop_attention(query, key, value, shared, scale, dropout)
