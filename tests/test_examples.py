"""The scripts under examples/: examples/cli_demo.py quits on an empty line and on Ctrl-D (end of input)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.timeouts import TIMEOUT

ROOT = Path(__file__).resolve().parents[1]
CLI_DEMO = ROOT / "examples" / "cli_demo.py"


def _cli_demo():
    spec = importlib.util.spec_from_file_location("cli_demo", CLI_DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines functions only: the chat starts under __main__
    return module


def _reader(lines):
    lines = iter(lines)

    def read(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    return read


@pytest.mark.parametrize(("typed", "messages"), [
    (["hello", " RESET ", "again"], ["hello", "RESET", "again"]),  # then Ctrl-D
    (["hello", "  ", "never read"], ["hello"]),  # a blank line quits
    ([], []),  # Ctrl-D at the first prompt
])
def test_messages_end_at_eof_or_empty_line(typed, messages, capsys):
    assert list(_cli_demo().messages(_reader(typed))) == messages


@pytest.mark.parametrize(("stdin", "prompts"), [
    ("hello\nRESET\nagain\n", 4),  # three messages, then end of input at the fourth prompt
    ("hello\n\nnever read\n", 2),
])
def test_cli_demo_quits_cleanly(tiny_llama, stdin, prompts):
    run = subprocess.run([sys.executable, str(CLI_DEMO), str(tiny_llama)], input=stdin, capture_output=True,
                         text=True, timeout=TIMEOUT, cwd=ROOT)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert run.stdout.count(">>> ") == prompts
