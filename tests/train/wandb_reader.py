"""Read the history of an offline W&B run back from its ``run-*.wandb`` file with wandb's own protobuf records.

wandb 0.31 ships no Python reader (its transaction log is written by the Go core), so this follows the file's
framing: a 7-byte header (``:W&B``, magic, version), then LevelDB-log blocks of 32 KiB whose records carry a
7-byte header (CRC, length, type: 1 full, 2 first, 3 middle, 4 last) and hold serialized ``Record`` messages."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK, HEADER = 32768, 7


def read_records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    pos, parts = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer: padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record
            parts = b""


def history(path: Path) -> list[dict]:
    """One dict per logged step: ``{"_step": n, key: value, ...}``."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            row = {"_step": record.history.step.num}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


def config(path: Path) -> dict:
    out = {}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind in ("config", "run"):
            updates = record.config.update if kind == "config" else record.run.config.update
            for item in updates:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out
