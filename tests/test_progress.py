"""The shared callback progress bar (tokenizing, writing and merging weights)."""

from __future__ import annotations

import pytest

from tunesmith.progress import callback_bar


@pytest.mark.parametrize("unit", ["count", "bytes"])
def test_bar_follows_done_and_total(unit, monkeypatch):
    from rich.progress import Progress

    updates = []
    real_update = Progress.update

    def spy(self, task, **kw):
        updates.append(kw)
        return real_update(self, task, **kw)

    monkeypatch.setattr(Progress, "update", spy)
    with callback_bar("working", unit=unit, enabled=True) as report:
        for done in range(0, 2049, 1024):
            report(done, 2048)
    assert [(u["completed"], u["total"]) for u in updates] == [(0, 2048), (1024, 2048), (2048, 2048)]


def test_no_bar_when_disabled_or_not_a_terminal():
    with callback_bar("working", enabled=False) as report:
        assert report is None
    with callback_bar("working", stderr=True) as report:  # pytest captures stderr: not a terminal
        assert report is None
