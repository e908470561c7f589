"""`check-custom-dataset` and `log-dataset`: look at a config's data before training on it.

- `check_dataset(cfg, tokenizer=None) -> CheckReport`: every record validated (problems listed with file and
  line), turns per conversation, and with a tokenizer the token-length statistics and histogram after
  templating plus how many samples exceed max_length (and how they would be truncated). Preference pairs
  (format kind "pairs") are encoded as training encodes them (`encode_pairs`): the report gives the pairs left,
  the length statistics of the chosen and of the rejected sequences, answers cut and pairs dropped.
- `CheckReport.format() -> str`, `CheckReport.ok`.
- `show_samples(cfg, tokenizer, show="all", n=2) -> str`: the first samples after templating
  (and packing when cfg packs): `text`, `masked_text` (what has loss; masked runs shown as `[masked: N]`),
  `input_ids`, `labels`. A row of preference pairs is shown sequence by sequence, each labelled
  `pair K chosen` / `pair K rejected` (K: the pair's index in the encoded data).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tunesmith.data.encode import IGNORE_INDEX
from tunesmith.data.pairs import PAIRS
from tunesmith.data.readers import Problem, ReadStats, check_records, get_format
from tunesmith.data.templates import data_template, resolve_system

SHOW_CHOICES = ("text", "masked_text", "input_ids", "labels", "all")


@dataclass
class CheckReport:
    path: str
    format_name: str
    read: ReadStats
    problems: list[Problem]
    max_length: int
    lengths: list[int] = field(default_factory=list)
    truncated: dict[str, int] = field(default_factory=dict)
    dropped_after_encoding: dict[str, int] = field(default_factory=dict)
    kind: str = "chat"  # the format's kind; "pairs": `lengths` alternate chosen, rejected (one pair after another)
    pairs: int = 0  # pairs left after tokenizing (pair formats)

    @property
    def ok(self) -> bool:
        return not self.problems and self.read.conversations > 0

    @property
    def over_max_length(self) -> int:
        return sum(1 for n in self.lengths if n > self.max_length)

    def histogram(self, bins: int = 8) -> list[tuple[int, int, int]]:
        if not self.lengths:
            return []
        hi = max(max(self.lengths), self.max_length)
        edges = np.linspace(0, hi, bins + 1).astype(int)
        counts, _ = np.histogram(self.lengths, bins=edges)
        return [(int(edges[i]), int(edges[i + 1]), int(counts[i])) for i in range(bins)]

    def format(self) -> str:
        r = self.read
        unit = "pairs" if self.kind == PAIRS else "conversations"
        out = [f"{self.path} (format {self.format_name}): {r.records_read} records, {r.conversations} usable {unit}"]
        if r.turns_histogram:
            turns = ", ".join(f"{k}: {v}" for k, v in sorted(r.turns_histogram.items()))
            out.append(f"turns per {'pair' if self.kind == PAIRS else 'conversation'}: {turns}")
        drops = {k: v for k, v in r.dropped.items() if k != "invalid record"}
        if drops:
            out.append("dropped by the format: " + ", ".join(f"{k}: {v}" for k, v in drops.items()))
        if self.problems:
            out.append(f"{len(self.problems)} problem(s):")
            out += [f"  {p.where}: {p.message}" for p in self.problems]
        if self.lengths:
            truncated = (f" (would be truncated: {', '.join(f'{k}: {v}' for k, v in self.truncated.items())})"
                         if self.truncated else "")
            if self.kind == PAIRS:
                chosen, rejected = self.lengths[0::2], self.lengths[1::2]
                out.append(f"pairs after tokenizing: {self.pairs} ({2 * self.pairs} sequences)")
                out.append(_length_line("tokens per chosen sequence", chosen))
                out.append(_length_line("tokens per rejected sequence", rejected))
                out.append("tokens per sequence (chosen and rejected):")
            else:
                out.append(_length_line("tokens per sample", self.lengths))
            width = max(c for _, _, c in self.histogram()) or 1
            for lo, hi, c in self.histogram():
                out.append(f"  {lo:>6}-{hi:<6} {c:>6} {'#' * max(0, round(40 * c / width))}")
            if self.kind == PAIRS:
                longer = [sum(1 for n in part if n > self.max_length) for part in (chosen, rejected)]
                out.append(f"longer than max_length {self.max_length}: chosen {longer[0]}, rejected {longer[1]}"
                           + truncated)
            else:
                out.append(f"longer than max_length {self.max_length}: {self.over_max_length}" + truncated)
        if self.dropped_after_encoding:
            out.append("dropped after tokenizing: " + ", ".join(f"{k}: {v}" for k, v in
                                                                self.dropped_after_encoding.items()))
        out.append("OK" if self.ok else "NOT OK: fix the problems above")
        return "\n".join(out)


def _length_line(label: str, lengths: list[int]) -> str:
    arr = np.asarray(lengths)
    return (f"{label}: min {arr.min()}, mean {arr.mean():.0f}, median {int(np.median(arr))}, "
            f"p95 {int(np.percentile(arr, 95))}, max {arr.max()}")


def check_dataset(cfg: Any, tokenizer: Any = None) -> CheckReport:
    d = cfg.data
    fmt = get_format(d.format)
    template = data_template(d)
    system = resolve_system(d.system, d.system_template)
    records, stats, problems = check_records(d.path, fmt, name=d.name, split=d.split)
    report = CheckReport(d.path, fmt.name, stats, problems, d.max_length, kind=fmt.kind)
    if tokenizer is not None and records:
        from tunesmith.data.dataset import encode_format  # imports torch: only when a tokenizer is given

        _, est = encode_format(records, fmt, tokenizer, template, system=system, max_length=d.max_length)
        if fmt.kind == PAIRS:
            report.pairs = est.samples // 2
        report.lengths = est.lengths
        report.truncated = dict(est.truncated)
        report.dropped_after_encoding = dict(est.dropped)
    return report


def masked_text(tokenizer: Any, input_ids: np.ndarray, labels: np.ndarray) -> str:
    parts, i, n = [], 0, len(input_ids)
    while i < n:
        j = i
        loss = labels[i] != IGNORE_INDEX
        while j < n and (labels[j] != IGNORE_INDEX) == loss:
            j += 1
        parts.append(tokenizer.decode([int(x) for x in input_ids[i:j]]) if loss else f"[masked: {j - i}]")
        i = j
    return "".join(parts)


def _views(tokenizer: Any, ids: np.ndarray, labels: np.ndarray, show: str) -> list[str]:
    out = []
    if show in ("text", "all"):
        out += ["[text]", tokenizer.decode([int(x) for x in ids])]
    if show in ("masked_text", "all"):
        out += ["[masked_text]", masked_text(tokenizer, ids, labels)]
    if show in ("input_ids", "all"):
        out += ["[input_ids]", str(ids.tolist())]
    if show in ("labels", "all"):
        out += ["[labels]", str(labels.tolist())]
    return out


def _pair_row(dataset: Any, k: int, tokenizer: Any, show: str, packed: bool) -> list[str]:
    """Row k of a pair dataset, split into its sequences (where positions restart), each labelled with its pair."""
    from tunesmith.data.pack import sequence_ids  # torch: only where a dataset was built

    item = dataset[k]
    ids, labels = item["input_ids"].numpy(), item["labels"].numpy()
    members = dataset.bins[k]  # sample indices in row order: pair j is samples 2j (chosen) and 2j + 1 (rejected)
    if "sequence_index" in item:  # shared prompts: the rejected rest follows its chosen, which holds the prefix
        seq = item["sequence_index"].numpy()
    else:
        seq = sequence_ids(item["position_ids"][None], [len(ids)])[0].numpy()
    out = [f"--- {'packed row' if packed else 'row'} {k} ({len(ids)} tokens, {len(members) // 2} "
           f"pair{'s' if len(members) != 2 else ''}) ---"]
    chosen_at = 0
    for s, idx in enumerate(members):
        where = np.flatnonzero(seq == s)
        lo, hi = int(where[0]), int(where[-1]) + 1
        seq_ids, seq_labels, note = ids[lo:hi], labels[lo:hi], ""
        shared = dataset.shared[idx // 2] if getattr(dataset, "shared", None) and idx % 2 else 0
        if idx % 2 == 0:
            chosen_at = lo
        elif shared:  # shown whole: the prefix it shares, then its own tokens
            seq_ids = np.concatenate([ids[chosen_at:chosen_at + shared], seq_ids])
            seq_labels = np.concatenate([labels[chosen_at:chosen_at + shared], seq_labels])
            note = f", the first {shared} held once with the chosen"
        out.append(f"-- pair {idx // 2} {'chosen' if idx % 2 == 0 else 'rejected'} ({len(seq_ids)} tokens{note}) --")
        out += _views(tokenizer, seq_ids, seq_labels, show)
    return out


def show_samples(cfg: Any, tokenizer: Any, show: str = "all", n: int = 2) -> str:
    from tunesmith.data.dataset import build_train_dataset

    dataset, stats = build_train_dataset(cfg, tokenizer)
    out = [stats.summary()]
    for k in range(min(n, len(dataset))):
        if getattr(dataset, "pairs", False):
            out += _pair_row(dataset, k, tokenizer, show, packed=cfg.data.pack_to_max_length)
            continue
        item = dataset[k]
        ids, labels = item["input_ids"].numpy(), item["labels"].numpy()
        title = f"--- {'packed sequence' if dataset.packed else 'sample'} {k} ({len(ids)} tokens"
        if dataset.packed:
            title += f", {int((item['position_ids'] == 0).sum())} samples"
        out.append(title + ") ---")
        out += _views(tokenizer, ids, labels, show)
    return "\n".join(out)
