"""Packing, collation and samplers: encoded samples -> training batches (docs/internals.md contract).

- `pack_bins(lengths, max_length, *, seed=None) -> list[list[int]]`: best-fit-decreasing bin packing of sample
  indices; every sample lands in exactly one bin (nothing dropped, unlike XTuner's Packer), no bin exceeds
  max_length, samples are never split. With a seed the bin order is shuffled.
- `PackedDataset(samples, bins)` / `SampleDataset(samples)`: map-style datasets (torch-compatible); an item
  is a dict of int64 tensors `input_ids`, `labels`, `position_ids` (restarting at 0 for each packed sample);
  the first label of every packed sample is -100 (nothing predicts across a boundary).
- `collate(items, pad_token_id, packed)`: pads to the longest row. Packed rows: padding gets its own
  position run (a separate "document" no real token attends to), no attention_mask, plus `cu_seq_lens`
  (int32). Unpacked rows with padding: `attention_mask`. Always `num_loss_tokens` = label positions that
  count after the causal shift.
- `LengthGroupedSampler(lengths, batch_size, seed, ...)` for unpacked runs; `EpochSampler` for packed runs;
  both are deterministic per (seed, epoch), shard by (rank, world_size) and resume at `start_index`.
- `make_dataloader(dataset, cfg, *, seed, epoch, rank=0, world_size=1, start_index=0) -> DataLoader`.
- `sample_starts(position_ids)`: where packed samples start (the one boundary rule, transformers' own);
  `cu_seqlens_from_position_ids(position_ids)` for varlen attention kernels; packed batches carry it as
  `cu_seq_lens`.

Preference pairs (`pair_dataset`): a pair's chosen and rejected sequences always sit in one row, one after the
other (positions restart, so attention never crosses them); packed rows hold whole pairs up to
`PAIR_ROW_FACTOR` x max_length tokens (max_length counts one sequence), unpacked rows hold one pair. Their batches
add `sequence_ids` (int64 [B, L]: the index of the sequence each token belongs to, counted over the whole
micro-batch row by row, -1 on padding; pair k is sequences 2k (chosen) and 2k+1 (rejected)), `num_pairs` and
`num_tokens` (the pairs' tokens, chosen and rejected counted in full: what tokens/s counts for pairs).

Shared prompts (`pair_dataset(..., share_prompt=True)`): chosen and rejected begin with the same tokens (system,
history, prompt). The row then holds them once: `[prefix | chosen rest | rejected rest]`, where the prefix is the
common start short of its last token and short of the first scored token (`shared_prefix`), so each rest begins
with an unscored token that predicts its first answer token within its own run. Positions continue the prefix in both
rests. Attention is no longer a set of separate blocks: the rejected rest attends to the prefix and itself, never to
the chosen rest. Such batches say so explicitly: `cu_seq_lens` (query segments: prefix + chosen rest, rejected
rest, padding), `kv_index` (int64: for each segment in turn, the flat token indices of its keys: the segment itself,
or the prefix then the rejected rest) and `cu_seq_lens_k` (int32 offsets into `kv_index`); only the packed
attention reads them (models/fast/shared_prompt.py), and tests/models/fast/test_logps.py checks the result equals the
plain layout's.

Attention isolation: transformers 5 (masking_utils.find_packed_sequence_indices) derives a block-diagonal
causal mask from position_ids that restart, in the sdpa / eager / flex / flash paths, when no
attention_mask and no KV cache are passed — the training forward must use `use_cache=False`
(tests/data/test_pack.py checks packed == unpacked loss).
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from tunesmith.data.encode import IGNORE_INDEX, Encoded, common_prefix_length


def pad_id_of(tokenizer: Any) -> int:
    """The id padding uses: the tokenizer's pad token, else its EOS, else 0 (labels and masks never depend on it)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id or 0)


def pack_bins(lengths: Sequence[int], max_length: int, *, seed: int | None = None) -> list[list[int]]:
    """Best-fit decreasing: each sample (longest first) goes into the fullest bin it still fits in."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin id)
    for i in order:
        n = int(lengths[i])
        if n > max_length:
            raise ValueError(f"sample {i} has {n} tokens > max_length {max_length} (encode truncates first)")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            cap, b = free.pop(k)
            bins[b].append(i)
            cap -= n
        else:
            b = len(bins)
            bins.append([i])
            cap = max_length - n
        if cap > 0:
            bisect.insort(free, (cap, b))
    if seed is not None:
        rng = random.Random(seed)
        rng.shuffle(bins)
        for b in bins:
            rng.shuffle(b)
    return bins


def _item(ids: np.ndarray, labels: np.ndarray, positions: np.ndarray) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.from_numpy(ids.astype(np.int64)), "labels": torch.from_numpy(labels.astype(np.int64)),
            "position_ids": torch.from_numpy(positions.astype(np.int64))}


class SampleDataset(Dataset):
    """One encoded sample per item (unpacked training)."""

    packed = False

    def __init__(self, samples: Sequence[Encoded]):
        self.samples = list(samples)
        self.lengths = [len(s.input_ids) for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = self.samples[i]
        return _item(s.input_ids, s.labels, np.arange(len(s.input_ids)))


class PackedDataset(Dataset):
    """Several encoded samples per item, concatenated; positions restart per sample."""

    packed = True
    pairs = False

    def __init__(self, samples: Sequence[Encoded], bins: Sequence[Sequence[int]]):
        self.samples = list(samples)
        self.bins = [list(b) for b in bins]
        self.lengths = [sum(len(self.samples[i].input_ids) for i in b) for b in self.bins]

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        parts = [self.samples[j] for j in self.bins[i]]
        ids = np.concatenate([p.input_ids for p in parts])
        labels = np.concatenate([p.labels for p in parts])
        positions = np.concatenate([np.arange(len(p.input_ids)) for p in parts])
        labels[positions == 0] = IGNORE_INDEX  # never predict a sample's first token from the previous one
        return _item(ids, labels, positions)


PAIR_ROW_FACTOR = 2  # a packed row of pairs holds this many times data.max_length tokens (max_length: one sequence)


def shared_prefix(chosen: Encoded, rejected: Encoded) -> int:
    """How many leading tokens a pair's two sequences can hold once: their common start, stopped one token short of
    its end and of the first scored token (module docstring); 0 when there is nothing to share."""
    common = common_prefix_length(chosen.input_ids, rejected.input_ids)
    scored = [int(np.flatnonzero(x.labels != IGNORE_INDEX)[0]) for x in (chosen, rejected)
              if (x.labels != IGNORE_INDEX).any()]
    return max(0, min([common, *scored]) - 1)


def pair_tokens(samples: Sequence[Encoded], k: int, shared: Sequence[int] | None) -> int:
    """The tokens pair ``k`` (samples 2k and 2k+1) takes in a row: both sequences, less what they hold once."""
    return len(samples[2 * k].input_ids) + len(samples[2 * k + 1].input_ids) - (shared[k] if shared else 0)


class PairDataset(PackedDataset):
    """Preference pairs in rows (module docstring): samples 2k and 2k+1 are pair k's chosen and rejected.
    ``shared``: per pair, the tokens its sequences hold once (``None``: the plain layout, each sequence whole)."""

    pairs = True
    reference_logps: np.ndarray | None = None  # DPO's precomputed reference, one log-probability per sample

    def __init__(self, samples: Sequence[Encoded], bins: Sequence[Sequence[int]], shared: Sequence[int] | None = None):
        super().__init__(samples, bins)
        self.shared = None if shared is None else list(shared)
        if self.shared is not None:
            self.lengths = [sum(pair_tokens(self.samples, i // 2, self.shared) for i in b[::2]) for b in self.bins]

    @property
    def num_pairs(self) -> int:
        return len(self.samples) // 2

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(i) if self.shared is None else self._shared_row(self.bins[i])
        item["num_tokens"] = torch.tensor(sum(len(self.samples[j].input_ids) for j in self.bins[i]))
        if self.reference_logps is not None:
            item["reference_logps"] = torch.from_numpy(self.reference_logps[self.bins[i]].astype(np.float32))
        return item

    def _shared_row(self, members: Sequence[int]) -> dict[str, torch.Tensor]:
        ids, labels, positions, owner, q_lengths, k_lengths, keys = [], [], [], [], [], [], []
        start = 0
        for s in range(0, len(members), 2):
            chosen, rejected = self.samples[members[s]], self.samples[members[s + 1]]
            p = self.shared[members[s] // 2]
            n_c, n_r = len(chosen.input_ids), len(rejected.input_ids) - p
            ids += [chosen.input_ids, rejected.input_ids[p:]]
            rest = rejected.labels[p:].copy()
            rest[0] = IGNORE_INDEX  # nothing predicts the rejected rest's first token across the chosen one
            first = chosen.labels.copy()
            first[0] = IGNORE_INDEX
            labels += [first, rest]
            positions += [np.arange(n_c), np.arange(p, p + n_r)]
            owner += [np.full(n_c, s), np.full(n_r, s + 1)]
            q_lengths += [n_c, n_r]
            k_lengths += [n_c, p + n_r]
            rest_at = start + n_c  # the rejected rest's keys: the prefix, then itself
            keys += [np.arange(start, rest_at), np.arange(start, start + p), np.arange(rest_at, rest_at + n_r)]
            start = rest_at + n_r
        item = _item(np.concatenate(ids), np.concatenate(labels), np.concatenate(positions))
        item["sequence_index"] = torch.from_numpy(np.concatenate(owner).astype(np.int64))
        item["q_lengths"] = torch.tensor(q_lengths)
        item["k_lengths"] = torch.tensor(k_lengths)
        item["kv_index"] = torch.from_numpy(np.concatenate(keys).astype(np.int64))
        return item


def pair_dataset(samples: Sequence[Encoded], max_length: int, *, pack: bool, seed: int | None,
                 share_prompt: bool = False) -> PairDataset:
    """Rows of whole pairs: packed into ``PAIR_ROW_FACTOR * max_length`` tokens, or one pair a row; with
    ``share_prompt`` each pair's common start is held once (module docstring)."""
    n = len(samples) // 2
    shared = [shared_prefix(samples[2 * k], samples[2 * k + 1]) for k in range(n)] if share_prompt else None
    if pack:
        sizes = [pair_tokens(samples, k, shared) for k in range(n)]
        groups = pack_bins(sizes, PAIR_ROW_FACTOR * max_length, seed=seed)
    else:
        groups = [[k] for k in range(n)]
    return PairDataset(samples, [[i for k in g for i in (2 * k, 2 * k + 1)] for g in groups], shared)


def sequence_ids(position_ids: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """For each token, the index of its sequence (a run of positions starting at 0) counted over the batch row by
    row; -1 on padding (positions at or past each row's length)."""
    starts = (position_ids == 0).long()
    ids = torch.full_like(position_ids, -1)
    offset = 0
    for r, k in enumerate(lengths):
        row = torch.cumsum(starts[r, :k], 0) - 1 + offset
        ids[r, :k] = row
        offset = int(row[-1]) + 1 if k else offset
    return ids


def collate(items: Sequence[dict[str, torch.Tensor]], pad_token_id: int, packed: bool,
            pad_to_multiple_of: int = 1, pairs: bool = False) -> dict[str, Any]:
    packed = packed or pairs  # a row of pairs holds two sequences or more: never an attention_mask
    lengths = [len(it["input_ids"]) for it in items]
    width = max(lengths)
    width = int(math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of)
    n = len(items)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    for r, it in enumerate(items):
        k = lengths[r]
        input_ids[r, :k] = it["input_ids"]
        labels[r, :k] = it["labels"]
        position_ids[r, :k] = it["position_ids"]
        position_ids[r, k:] = torch.arange(width - k)  # padding: its own run of positions
    batch: dict[str, Any] = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if not packed and any(k < width for k in lengths):
        mask = torch.zeros((n, width), dtype=torch.long)
        for r, k in enumerate(lengths):
            mask[r, :k] = 1
        batch["attention_mask"] = mask
    if packed:  # computed here, on the host, so the training step needs no device-to-host copy to find them
        batch["cu_seq_lens"] = cu_seqlens_from_position_ids(position_ids)
    batch["num_loss_tokens"] = int((labels[:, 1:] != IGNORE_INDEX).sum())
    if pairs:
        if "kv_index" in items[0]:
            batch.update(_shared_attention(items, lengths, width))
        else:
            batch["sequence_ids"] = sequence_ids(position_ids, lengths)
        batch["num_pairs"] = (int(batch["sequence_ids"].max()) + 1) // 2
        batch["num_tokens"] = int(sum(int(it["num_tokens"]) for it in items))
        if "reference_logps" in items[0]:
            batch["reference_logps"] = torch.cat([it["reference_logps"] for it in items])
    return batch


def _shared_attention(items: Sequence[dict[str, torch.Tensor]], lengths: Sequence[int], width: int
                      ) -> dict[str, torch.Tensor]:
    """The batch keys of rows with shared prompts (module docstring): segments and their keys over the flattened
    ``[B * width]`` tokens, padding a segment of its own, and the sequence ids."""
    q_lengths, k_lengths, keys = [], [], []
    owners = torch.full((len(items), width), -1, dtype=torch.long)
    offset = 0
    for r, (it, k) in enumerate(zip(items, lengths)):
        base = r * width
        q_lengths.append(it["q_lengths"])
        k_lengths.append(it["k_lengths"])
        keys.append(it["kv_index"] + base)
        if k < width:
            q_lengths.append(torch.tensor([width - k]))
            k_lengths.append(torch.tensor([width - k]))
            keys.append(torch.arange(base + k, base + width))
        owners[r, :k] = it["sequence_index"] + offset
        offset += int(it["sequence_index"].max()) + 1
    zero = torch.zeros(1, dtype=torch.long)
    return {"cu_seq_lens": torch.cat([zero, torch.cat(q_lengths)]).cumsum(0).to(torch.int32),
            "cu_seq_lens_k": torch.cat([zero, torch.cat(k_lengths)]).cumsum(0).to(torch.int32),
            "kv_index": torch.cat(keys), "sequence_ids": owners}


def sample_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, L]``: True where a packed sample starts, i.e. where the position does not follow the previous one
    by exactly 1 (transformers' own rule for its packed mask, so every path agrees on the boundaries)."""
    pos = position_ids if position_ids.dim() == 2 else position_ids.view(1, -1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = (pos[:, 1:] - pos[:, :-1]) != 1
    return starts


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative sample lengths over the flattened ``[B * L]`` batch (int32, from 0): the ``cu_seq_lens``
    argument of variable-length attention kernels."""
    starts = sample_starts(position_ids).reshape(-1).nonzero().reshape(-1)
    return torch.cat([starts, starts.new_tensor([position_ids.numel()])]).to(torch.int32)


def _shard(indices: list[int], rank: int, world_size: int) -> list[int]:
    if world_size == 1:
        return indices
    total = int(math.ceil(len(indices) / world_size)) * world_size
    indices = indices + indices[: total - len(indices)]  # repeat a few so every rank gets the same count
    return indices[rank:total:world_size]


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, sharded over ranks, resumable at `start_index` (this rank's position)."""

    def __init__(self, n: int, *, seed: int, epoch: int, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 start_index: int = 0):
        order = list(range(n))
        if shuffle:
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
        self.indices = _shard(order, rank, world_size)[start_index:]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class LengthGroupedSampler(Sampler[int]):
    """Random megabatches (mega_batch_mult x global batch), each sorted longest first, the longest sample of the
    epoch first (an early out-of-memory, not a late one), as XTuner's LengthGroupedSampler."""

    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int, epoch: int, rank: int = 0,
                 world_size: int = 1, start_index: int = 0, mega_batch_mult: int | None = None):
        n = len(lengths)
        total_batch = batch_size * world_size
        if mega_batch_mult is None:
            mega_batch_mult = max(1, min(n // max(1, total_batch * 4), 50))
        mega = mega_batch_mult * total_batch
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        groups = [sorted(order[i:i + mega], key=lambda j: -lengths[j]) for i in range(0, n, mega)]
        if groups:
            longest = max(range(len(groups)), key=lambda g: lengths[groups[g][0]])
            groups[0][0], groups[longest][0] = groups[longest][0], groups[0][0]
        flat = [i for g in groups for i in g]
        # deal whole global batches out so each rank's micro-batch holds similar lengths
        flat = flat + flat[: (-len(flat)) % total_batch] if world_size > 1 else flat
        mine = []
        for b in range(0, len(flat), total_batch):
            chunk = flat[b:b + total_batch]
            mine += chunk[rank * batch_size:(rank + 1) * batch_size]
        self.indices = mine[start_index:]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class _Collate:
    def __init__(self, pad_token_id: int, packed: bool, pairs: bool = False):
        self.pad_token_id, self.packed, self.pairs = pad_token_id, packed, pairs

    def __call__(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, Any]:
        return collate(items, self.pad_token_id, self.packed, pairs=self.pairs)


def make_dataloader(dataset: SampleDataset | PackedDataset, cfg: Any, *, seed: int, epoch: int, rank: int = 0,
                    world_size: int = 1, start_index: int = 0, pad_token_id: int | None = None) -> DataLoader:
    """Batches of `cfg.training.batch_size` following the training-batch contract. `start_index` is the number
    of samples this rank already consumed in this epoch (resume). Pad id: `pad_token_id`, else
    `dataset.pad_token_id` (set by build_train_dataset), else 0 (labels and masks never depend on it)."""
    bs = cfg.training.batch_size
    if dataset.packed:
        sampler: Sampler[int] = EpochSampler(len(dataset), seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                                             start_index=start_index)
    else:
        sampler = LengthGroupedSampler(dataset.lengths, bs, seed=seed, epoch=epoch, rank=rank,
                                       world_size=world_size, start_index=start_index)
    pad = pad_token_id if pad_token_id is not None else getattr(dataset, "pad_token_id", None)
    return DataLoader(dataset, batch_size=bs, sampler=sampler, num_workers=cfg.data.num_workers,
                      collate_fn=_Collate(0 if pad is None else int(pad), dataset.packed,
                                          getattr(dataset, "pairs", False)), drop_last=False,
                      persistent_workers=False)
