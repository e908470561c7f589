"""Build the training dataset from a TrainConfig: read -> template -> tokenize (cached) -> pack.

Public API (what `train/` calls):

    # rank 0 first, then the other ranks (a cache hit); progress(done, total) while tokenizing
    dataset, stats = build_train_dataset(cfg, tokenizer, progress=None)
    loader = make_dataloader(dataset, cfg, seed=cfg.training.seed, epoch=e, rank=r, world_size=w,
                             start_index=samples_done_this_epoch)  # from tunesmith.data.pack

`dataset` is a map-style torch dataset (`PackedDataset` when cfg.data.pack_to_max_length, else
`SampleDataset`) with `.lengths`, `.packed` and `.pad_token_id`; `stats` is a `DataStats` (records read,
dropped with reasons, truncated, samples, packed sequences, pad fraction, tokens, loss tokens, cache).

Cache: tokenized samples live in `<root>/<key>/samples.npz` (+ `stats.json`), no pickle; root is
cfg.data.cache_dir, else `$TUNESMITH_CACHE/datasets`, else `~/.cache/tunesmith/datasets`. The key hashes the
data files' bytes (or the hub id), the tokenizer (vocabulary, special tokens, chat template), the template,
the format, the system prompt, max_length, max_dataset_length (and the seed choosing that subset),
the part (training or validation) and its split, and ENCODE_VERSION. Packing is cheap and is
redone every run (it depends on the seed).

Validation (`data.validation`): a file is read and encoded exactly as the training data (same format, template,
system prompt and max_length; its own cache entry). A fraction `f` holds out `f` of the conversations of
`data.path` (after max_dataset_length, before tokenizing and packing), chosen with training.seed by
`convert.split_indices`; a training conversation identical to a held-out one is dropped too, so the model never
trains on what it is validated on. The fraction and the seed are in both parts' cache keys.

    val_dataset, val_stats = build_validation_dataset(cfg, tokenizer)  # None, None without data.validation
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith.data.conversation import with_default_system
from tunesmith.data.encode import ENCODE_VERSION, Encoded, EncodeStats, encode_records
from tunesmith.data.pack import PAIR_ROW_FACTOR, PackedDataset, SampleDataset, pack_bins, pad_id_of, pair_dataset
from tunesmith.data.pairs import PAIRS, encode_pairs
from tunesmith.data.readers import MALFORMED, get_format, read_records
from tunesmith.data.sources import data_files
from tunesmith.data.templates import data_template, resolve_system
from tunesmith.errors import TunesmithError
from tunesmith.files import atomic_path


@dataclass
class DataStats:
    records_read: int = 0
    conversations: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    pairs: int = 0  # preference pairs (each two samples: the chosen and the rejected sequence)
    packed_sequences: int = 0
    pad_fraction: float = 0.0
    shared_tokens: int = 0  # pairs: prompt tokens held once instead of twice (preference.share_prompt)
    tokens: int = 0
    loss_tokens: int = 0
    max_length: int = 0
    turns_histogram: dict[str, int] = field(default_factory=dict)
    malformed_at: dict[str, list[str]] = field(default_factory=dict)  # reason -> first locations
    cache_hit: bool = False
    cache_path: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        kept = {k: v for k, v in self.dropped.items() if k not in self.malformed_at}
        dropped = sum(kept.values())
        truncated = sum(self.truncated.values())
        units = f"pairs {self.pairs} ({self.samples} sequences)" if self.pairs else f"samples {self.samples}"
        lines = [
            f"records read {self.records_read}, conversations {self.conversations}, {units}, "
            f"tokens {self.tokens} ({self.loss_tokens} with loss)",
            f"dropped {dropped}" + (f" ({', '.join(f'{k}: {v}' for k, v in kept.items())})" if dropped else ""),
            f"truncated to max_length {self.max_length}: {truncated}"
            + (f" ({', '.join(f'{k}: {v}' for k, v in self.truncated.items())})" if truncated else ""),
        ]
        if self.malformed_at:
            skipped = sum(self.dropped.get(k, 0) for k in self.malformed_at)
            lines.append(f"skipped {skipped} malformed records (data.strict: true stops at the first instead):")
            lines += [f"  {reason.removeprefix(MALFORMED)}: {self.dropped.get(reason, 0)} (first at {', '.join(at)})"
                      for reason, at in self.malformed_at.items()]
        if self.shared_tokens:
            lines.append(f"shared prompts: {self.shared_tokens} tokens held once, "
                         f"{self.shared_tokens / max(self.tokens, 1):.1%} of the pairs' tokens not computed twice")
        if self.packed_sequences:
            lines.append(f"packed into {self.packed_sequences} sequences, pad fraction {self.pad_fraction:.2%}")
        if self.cache_path:
            lines.append(("cache hit: " if self.cache_hit else "cached at: ") + self.cache_path)
        return "\n".join(lines)


def cache_root(cfg: Any = None) -> Path:
    if cfg is not None and cfg.data.cache_dir:
        return Path(cfg.data.cache_dir).expanduser()
    if os.environ.get("TUNESMITH_CACHE"):
        return Path(os.environ["TUNESMITH_CACHE"]).expanduser() / "datasets"
    return Path("~/.cache/tunesmith/datasets").expanduser()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    else:
        h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr((tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token,
                   getattr(tokenizer, "chat_template", None), type(tokenizer).__name__)).encode())
    return h.hexdigest()


def data_fingerprint(path: str, name: str | None, split: str | None) -> str:
    p = Path(path).expanduser()
    h = hashlib.sha256()
    if p.exists():
        for f in data_files(p, split):
            h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    else:
        h.update(f"hub:{path}:{name}:{split}".encode())
    return h.hexdigest()


TRAIN, VALIDATION = "train", "validation"


def _split_key(d: Any, seed: int, part: str) -> dict[str, Any] | None:
    """What the held-out split adds to a part's cache key (nothing for training data beside a validation file, so
    such runs share the cache of runs without validation)."""
    if isinstance(d.validation, float):
        return {"part": part, "fraction": d.validation, "seed": seed}
    if part == VALIDATION:
        return {"part": part, "file": True}
    return None


def cache_key(cfg: Any, tokenizer: Any, part: str = TRAIN) -> str:
    d = cfg.data
    template = data_template(d)
    from_file = part == VALIDATION and isinstance(d.validation, str)
    parts = {
        "v": ENCODE_VERSION, "format": d.format,
        "data": data_fingerprint(d.validation, None, None) if from_file else data_fingerprint(d.path, d.name, d.split),
        "template": repr(template), "system": resolve_system(d.system, d.system_template),
        "max_length": d.max_length, "max_dataset_length": None if from_file else d.max_dataset_length,
        "subset_seed": cfg.training.seed if d.max_dataset_length and not from_file else None,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    split = _split_key(d, cfg.training.seed, part)
    if split is not None:  # absent otherwise: keys of runs without validation stay what they were
        parts["split"] = split
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _save(folder: Path, samples: list[Encoded], meta: dict[str, Any]) -> None:
    lengths = np.asarray([len(s.input_ids) for s in samples], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.concatenate([s.input_ids for s in samples]) if samples else np.zeros(0, np.int32)
    labels = np.concatenate([s.labels for s in samples]) if samples else np.zeros(0, np.int32)
    with atomic_path(folder, is_dir=True) as tmp:
        np.savez(tmp / "samples.npz", input_ids=ids.astype(np.int32), labels=labels.astype(np.int32), offsets=offsets)
        (tmp / "stats.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")


def _load(folder: Path) -> tuple[list[Encoded], dict[str, Any]] | None:
    try:
        meta = json.loads((folder / "stats.json").read_text(encoding="utf-8"))
        with np.load(folder / "samples.npz", allow_pickle=False) as z:
            ids, labels, offsets = z["input_ids"], z["labels"], z["offsets"]
    except (OSError, ValueError, KeyError):
        return None
    samples = [Encoded(ids[a:b], labels[a:b]) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    return samples, meta


def keep_random_subset(records: list, stats: Any, n: int | None, *, seed: int) -> list:
    """XTuner's max_dataset_length: a random `n` of the conversations (not the first n), the same for the same
    seed, kept in file order; the rest count as dropped in `stats`."""
    if n is None or len(records) <= n:
        return records
    keep = sorted(random.Random(seed).sample(range(len(records)), n))
    kept = [records[i] for i in keep]
    stats.dropped[f"beyond max_dataset_length (a random {n} kept)"] += len(records) - n
    stats.conversations = len(kept)
    stats.turns_histogram = Counter(len(r.turns) for r in kept)
    return kept


def hold_out(records: list, stats: Any, fraction: float, *, seed: int, part: str) -> list:
    """The training or the validation conversations of a held-out ``fraction`` (see the module docstring); `stats`
    counts the part's conversations, and training duplicates of held-out conversations as dropped."""
    from tunesmith.data.convert import split_indices

    if len(records) < 2:
        raise TunesmithError(f"data.validation {fraction} needs at least 2 conversations, {len(records)} read",
                             "add data, or give data.validation a file")
    train_idx, val_idx = split_indices(len(records), 1.0 - fraction, seed=seed)
    held = [records[i] for i in val_idx]
    if part == VALIDATION:
        kept = held
    else:
        seen = {repr(r.turns) for r in held}
        kept = [records[i] for i in train_idx if repr(records[i].turns) not in seen]
        if len(kept) < len(train_idx):
            stats.dropped["same as a validation conversation"] += len(train_idx) - len(kept)
    stats.conversations = len(kept)
    stats.turns_histogram = Counter(len(r.turns) for r in kept)
    return kept


def validate_data_names(cfg: Any) -> None:
    """Fail fast (before loading a tokenizer or reading data) on unknown format / template / system names, and on
    a format that does not hold what ``training.objective`` trains on."""
    fmt = get_format(cfg.data.format)
    data_template(cfg.data)
    resolve_system(cfg.data.system, cfg.data.system_template)
    objective = getattr(getattr(cfg, "training", None), "objective", "sft")
    if objective != "sft" and fmt.kind != PAIRS:
        raise TunesmithError(f"training.objective {objective} trains on preference pairs, but data.format "
                             f"{fmt.name!r} holds answers", "set data.format preference (or ultrafeedback, hh_rlhf)")
    if objective == "sft" and fmt.kind == PAIRS:
        raise TunesmithError(f"data.format {fmt.name!r} holds preference pairs, but training.objective is sft",
                             "set training.objective dpo or orpo")


def tokenize_dataset(cfg: Any, tokenizer: Any, *, use_cache: bool = True,
                     progress: Callable[[int, int], None] | None = None,
                     part: str = TRAIN) -> tuple[list[Encoded], DataStats]:
    """Read, template and tokenize cfg.data (from the cache when the same inputs were tokenized before).
    `progress(done, total)` reports tokenization (conversations) for a progress bar. ``part``: the training
    conversations, or the validation ones (`data.validation`)."""
    d = cfg.data
    validate_data_names(cfg)  # unknown names, or pairs with sft, fail before any reading
    fmt = get_format(d.format)
    template = data_template(d)
    system = resolve_system(d.system, d.system_template)
    start = time.perf_counter()
    folder = cache_root(cfg) / cache_key(cfg, tokenizer, part) if use_cache else None
    if folder is not None and (hit := _load(folder)) is not None:
        samples, meta = hit
        stats = DataStats(**{k: v for k, v in meta.items() if k in DataStats.__dataclass_fields__})
        stats.cache_hit, stats.cache_path = True, str(folder)
        stats.seconds = time.perf_counter() - start
        return samples, stats
    if part == VALIDATION and isinstance(d.validation, str):
        if not Path(d.validation).expanduser().exists():
            raise TunesmithError(f"data.validation {d.validation} does not exist",
                                 "give a file in the training data's format, or a held-out fraction such as 0.05")
        records, rstats = read_records(d.validation, fmt, split=None, strict=d.strict)
    else:
        records, rstats = read_records(d.path, fmt, name=d.name, split=d.split, strict=d.strict)
        records = keep_random_subset(records, rstats, d.max_dataset_length, seed=cfg.training.seed)
        if isinstance(d.validation, float):
            records = hold_out(records, rstats, d.validation, seed=cfg.training.seed, part=part)
    report = (lambda n: progress(n, len(records))) if progress is not None else None
    samples, estats = encode_format(records, fmt, tokenizer, template, system=system, max_length=d.max_length,
                                    progress=report)
    stats = _merge(rstats.as_dict(), estats, d.max_length)
    stats.pairs = estats.samples // 2 if fmt.kind == PAIRS else 0
    if folder is not None:
        stats.cache_path = str(folder)
        _save(folder, samples, stats.as_dict())
    stats.seconds = time.perf_counter() - start
    return samples, stats


def encode_format(records: list, fmt: Any, tokenizer: Any, template: Any, *, system: str, max_length: int,
                  progress: Callable[[int], None] | None = None) -> tuple[list[Encoded], EncodeStats]:
    """Read records of format ``fmt`` encoded as training encodes them (check-custom-dataset too): the system
    prompt on every conversation without one (not plain text), pairs through ``encode_pairs``."""
    convs = [with_default_system(r.turns, system) if fmt.kind != "text" else r.turns for r in records]
    if fmt.kind == PAIRS:
        return encode_pairs(convs, tokenizer, template, max_length=max_length, progress=progress)
    return encode_records(convs, tokenizer, template, max_length=max_length, kind=fmt.kind, progress=progress)


def _merge(read: dict[str, Any], enc: EncodeStats, max_length: int) -> DataStats:
    dropped = dict(read["dropped"])
    for k, v in enc.dropped.items():
        dropped[k] = dropped.get(k, 0) + v
    return DataStats(records_read=read["records_read"], conversations=read["conversations"], dropped=dropped,
                     truncated=dict(enc.truncated), samples=enc.samples, tokens=enc.tokens,
                     loss_tokens=enc.loss_tokens, max_length=max_length,
                     turns_histogram={str(k): v for k, v in read["turns_histogram"].items()},
                     malformed_at=dict(read["malformed_at"]))


def pack_dataset(samples: list[Encoded], max_length: int, *, seed: int | None) -> PackedDataset:
    bins = pack_bins([len(s.input_ids) for s in samples], max_length, seed=seed)
    return PackedDataset(samples, bins)


def build_train_dataset(cfg: Any, tokenizer: Any, *, use_cache: bool = True,
                        progress: Callable[[int, int], None] | None = None
                        ) -> tuple[PackedDataset | SampleDataset, DataStats]:
    """The training dataset of cfg (see the module docstring) and its statistics; `progress(done, total)`
    is called while tokenizing (not on a cache hit)."""
    samples, stats = tokenize_dataset(cfg, tokenizer, use_cache=use_cache, progress=progress)
    d = cfg.data
    return _as_dataset(samples, stats, cfg, tokenizer, seed=cfg.training.seed if d.shuffle_before_pack else None)


def build_validation_dataset(cfg: Any, tokenizer: Any, *, use_cache: bool = True,
                             progress: Callable[[int, int], None] | None = None
                             ) -> tuple[PackedDataset | SampleDataset | None, DataStats | None]:
    """The validation dataset of cfg (packed and padded as the training data, in a fixed order), or (None, None)
    without data.validation."""
    if cfg.data.validation is None:
        return None, None
    samples, stats = tokenize_dataset(cfg, tokenizer, use_cache=use_cache, progress=progress, part=VALIDATION)
    return _as_dataset(samples, stats, cfg, tokenizer, seed=None)


def _as_dataset(samples: list[Encoded], stats: DataStats, cfg: Any, tokenizer: Any, *, seed: int | None
                ) -> tuple[PackedDataset | SampleDataset, DataStats]:
    d = cfg.data
    if get_format(d.format).kind == PAIRS:
        dataset: PackedDataset | SampleDataset = pair_dataset(samples, d.max_length, pack=d.pack_to_max_length,
                                                              seed=seed, share_prompt=cfg.shares_prompt())
        stats.packed_sequences = len(dataset) if d.pack_to_max_length else 0
        stats.shared_tokens = sum(dataset.shared or ())
        capacity = len(dataset) * PAIR_ROW_FACTOR * d.max_length
        stats.pad_fraction = 1.0 - sum(dataset.lengths) / capacity if capacity and d.pack_to_max_length else 0.0
    elif d.pack_to_max_length:
        dataset = pack_dataset(samples, d.max_length, seed=seed)
        stats.packed_sequences = len(dataset)
        capacity = len(dataset) * d.max_length
        stats.pad_fraction = 1.0 - stats.tokens / capacity if capacity else 0.0
    else:
        dataset = SampleDataset(samples)
        stats.packed_sequences = 0
        stats.pad_fraction = 0.0
    dataset.pad_token_id = pad_id_of(tokenizer)
    return dataset, stats
