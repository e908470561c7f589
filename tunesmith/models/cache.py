"""Where materialised models live, and a lock so two processes never build the same folder twice."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def cache_root() -> Path:
    """`$TUNESMITH_CACHE` or `~/.cache/tunesmith` (the data stage keeps its datasets beside us)."""
    env = os.environ.get("TUNESMITH_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/tunesmith").expanduser()


def models_cache() -> Path:
    return cache_root() / "models"


@contextlib.contextmanager
def build_lock(final: Path) -> Iterator[None]:
    """Hold an exclusive lock beside `final` while it is built (a no-op where fcntl is missing).

    The folder itself is written atomically (tunesmith.files.atomic_path); the lock only saves the second
    process from repeating a minute of work: it waits, then finds the folder complete.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: atomic rename alone keeps the result whole
        yield
        return
    with open(final.parent / f".{final.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
