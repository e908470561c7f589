"""The shared callback progress (tokenizing, writing and merging weights): a bar on a terminal, a few plain lines
without one; the duration and ETA every log line uses."""

from __future__ import annotations

import pytest

from tunesmith.progress import callback_bar, eta, format_duration


@pytest.mark.parametrize("unit", ["count", "bytes"])
def test_bar_follows_done_and_total(unit, monkeypatch):
    from rich.progress import Progress

    updates = []
    real_update = Progress.update

    def spy(self, task, **kw):
        updates.append(kw)
        return real_update(self, task, **kw)

    monkeypatch.setattr(Progress, "update", spy)
    with callback_bar("working", unit=unit, bar=True) as report:
        for done in range(0, 2049, 1024):
            report(done, 2048)
    assert [(u["completed"], u["total"]) for u in updates] == [(0, 2048), (1024, 2048), (2048, 2048)]


def test_nothing_when_disabled(capsys):
    with callback_bar("working", enabled=False) as report:
        assert report is None
    assert capsys.readouterr() == ("", "")


def test_plain_start_and_done_lines_when_not_a_terminal(capsys):
    """Output to a file or a pipe (pytest captures it: not a terminal): no bar, a plain line at the start and one
    at the end with the duration, on the stream asked for, flushed, with no escape codes or carriage returns."""
    with callback_bar("writing", unit="bytes", stderr=True) as report:
        assert report is not None
        for done in range(0, 2_000_001, 500_000):
            report(done, 2_000_000)
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == ["writing: started, 2.0 MB in all", "writing: done, 2.0 MB in 0:00:00"]
    assert "\x1b" not in err and "\r" not in err


def test_plain_lines_for_slow_work_are_few(monkeypatch):
    """Work of minutes gets at most one line per quarter between start and done, each with elapsed time and
    ETA, however often it reports; work that never reports (a cache hit) prints nothing."""
    clock = [0.0]
    monkeypatch.setattr("tunesmith.progress.time.perf_counter", lambda: clock[0])
    lines: list[str] = []
    with callback_bar("tokenizing", bar=False, printer=lines.append) as report:
        for done in range(0, 1001):
            report(done, 1000)
            clock[0] += 0.3  # 300 s in all
    assert lines == ["tokenizing: started, 1,000 in all",
                     "tokenizing: 25% (250 of 1,000), elapsed 0:01:15, ETA 0:03:45",
                     "tokenizing: 50% (500 of 1,000), elapsed 0:02:30, ETA 0:02:30",
                     "tokenizing: 75% (750 of 1,000), elapsed 0:03:45, ETA 0:01:15",
                     "tokenizing: done, 1,000 in 0:05:00"]
    lines.clear()
    with callback_bar("tokenizing", bar=False, printer=lines.append):
        pass
    assert lines == []


def test_durations_and_eta():
    assert format_duration(0) == "0:00:00" and format_duration(3725.4) == "1:02:05"
    assert format_duration(None) == "-:--:--" and format_duration(float("inf")) == "-:--:--"
    assert eta(10.0, 5, 15) == 30.0 and eta(10.0, 0, 15) is None
