"""How long a test waits for work in another process, thread or server: one limit for the whole suite.

``TIMEOUT`` (seconds) is generous on purpose: it is a guard against a hang, not a speed test (benchmarks are
``tunesmith bench``), and a loaded 2-core machine may take minutes for a whole-CLI run that takes seconds on a
quiet one. Set ``TUNESMITH_TEST_TIMEOUT`` to change it. Polling waits on a condition until that deadline
(`wait_for`), never for a fixed time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

TIMEOUT = float(os.environ.get("TUNESMITH_TEST_TIMEOUT", "1200"))

T = TypeVar("T")


def wait_for(condition: Callable[[], T], what: str | Callable[[], str], *, timeout: float = TIMEOUT,
             interval: float = 0.05) -> T:
    """Call ``condition`` until it returns something true and return that; fail naming ``what`` (or what it
    returns then: a log's tail, say) when ``timeout`` seconds pass first. ``condition`` may itself assert (a
    process that died, say) to stop early."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what if isinstance(what, str) else what()}: not within {timeout:.0f} s "
                                 "(TUNESMITH_TEST_TIMEOUT)")
        time.sleep(interval)
