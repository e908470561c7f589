"""Training batches for the benchmark, shaped like the data stage's (docs/internals.md).

* ``plain_batch``: what the baseline user loop feeds, one ``1 x L`` row of random tokens, loss on every token.
* ``packed_batches``: oasst1-shaped samples (turn lengths from ``oasst1_lengths.json`` beside this file, filled
  with random ids) packed into rows of ``L``: ``position_ids`` restart at 0 per sample, ``labels`` are -100 on
  prompts and on a sample's first token, loss on answers plus a closing end-of-turn token. A sample that does
  not fit the rest of a row continues in the next row (nothing dropped), as a new segment there.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import torch

from tunesmith.data.pack import cu_seqlens_from_position_ids

TEMPLATE_TOKENS = 8  # "<|User|>:" ... "<eoh>\n<|Bot|>:" around each prompt (internlm_chat), about


def _sample_tokens(turns: list[tuple[int, int]]) -> list[tuple[int, bool]]:
    """(length, has_loss) runs of one conversation."""
    runs = []
    for prompt, answer in turns:
        runs.append((prompt + TEMPLATE_TOKENS, False))
        runs.append((answer + 1, True))  # + end-of-turn token, which must be learned
    return runs


@functools.cache
def oasst1_turns() -> list[list[tuple[int, int]]]:
    """Per conversation, ``(prompt tokens, answer tokens)`` of each turn (see the file's "about")."""
    data = json.loads((Path(__file__).with_name("oasst1_lengths.json")).read_text(encoding="utf-8"))
    return [[(int(p), int(a)) for p, a in conv] for conv in data["turns"]]


def plain_batch(seq_len: int, vocab: int, device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, seq_len), generator=g)
    return {"input_ids": ids.to(device), "labels": ids.clone().to(device)}


def packed_batches(seq_len: int, vocab: int, n_rows: int, device, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    order = list(range(len(oasst1_turns())))
    rows: list[dict] = []
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    lengths: list[int] = []
    lengths_all: list[list[int]] = []

    def flush():
        nonlocal ids, labels, pos, lengths
        t = torch.tensor
        positions = t([pos], dtype=torch.long)
        rows.append(
            {
                "input_ids": t([ids], dtype=torch.long).to(device),
                "labels": t([labels], dtype=torch.long).to(device),
                "position_ids": positions.to(device),
                # as the data stage's collator does, on the host
                "cu_seq_lens": cu_seqlens_from_position_ids(positions).to(device),
            }
        )
        lengths_all.append(lengths)
        ids, labels, pos, lengths = [], [], [], []

    while len(rows) < n_rows:
        rng.shuffle(order)
        for k in order:
            runs = _sample_tokens(oasst1_turns()[k])
            seg = 0
            for length, has_loss in runs:
                for _ in range(length):
                    if len(ids) == seq_len:
                        lengths.append(seg)
                        flush()
                        seg = 0
                        if len(rows) == n_rows:
                            break
                    tok = int(torch.randint(0, vocab, (1,), generator=g))
                    ids.append(tok)
                    labels.append(tok if has_loss and seg > 0 else -100)
                    pos.append(seg)
                    seg += 1
                if len(rows) == n_rows:
                    break
            if len(rows) == n_rows:
                break
            lengths.append(seg)
    for row, lens in zip(rows, lengths_all):
        row["num_loss_tokens"] = int((row["labels"][:, 1:] != -100).sum())
        row["sample_lengths"] = [n for n in lens if n > 0]
    return rows
