"""Helpers of the data tests (shared files, configs)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FILES = Path(__file__).resolve().parent / "files"
# the team's shared data folder sits beside the checkout (../shared); a CI checkout elsewhere can point
# TUNESMITH_SHARED_DATA at it, and the usual workplace location is tried last
_CANDIDATES = [
    os.environ.get("TUNESMITH_SHARED_DATA", ""),
    str(Path(__file__).resolve().parents[3] / "shared" / "data"),
    "/work/shared/data",
]
SHARED = next((Path(c) for c in _CANDIDATES if c and Path(c).is_dir()), Path(_CANDIDATES[1]))


def shared_file(rel: str) -> Path:
    path = SHARED / rel
    if not path.exists():
        pytest.skip(f"{path} is not available")
    return path


def make_cfg(tmp_path, **data):
    from tunesmith.config import TrainConfig

    data.setdefault("cache_dir", str(tmp_path / "cache"))
    return TrainConfig.model_validate({"method": "full", "data": data})


def messages(turns, system=""):
    """Turns as OpenAI-style chat messages (what apply_chat_template and exported templates take)."""
    out = [{"role": "system", "content": system}] if system else []
    for t in turns:
        out.append({"role": "user", "content": t.input})
        if t.output:
            out.append({"role": "assistant", "content": t.output})
    return out
