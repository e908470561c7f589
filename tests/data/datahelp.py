"""Helpers of the data tests (shared files, configs)."""

from __future__ import annotations

from pathlib import Path

import pytest

FILES = Path(__file__).resolve().parent / "files"
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def shared_file(rel: str) -> Path:
    path = SHARED / rel
    if not path.exists():
        pytest.skip(f"{path} is not available")
    return path


def make_cfg(tmp_path, **data):
    from tunesmith.config import TrainConfig

    data.setdefault("cache_dir", str(tmp_path / "cache"))
    return TrainConfig.model_validate({"method": "full", "data": data})
