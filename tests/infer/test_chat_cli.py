"""`tunesmith chat` driven through stdin on the real SmolLM2 (bounded tokens), and the Python API example."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.timeouts import TIMEOUT
from tunesmith.infer.repl import PROMPT, RESET_MESSAGE

MODEL = "builtin:smollm2-135m-instruct"


def _chat(stdin: str, *args: str, env=None, timeout=TIMEOUT):
    cmd = [sys.executable, "-m", "tunesmith", "chat", MODEL, "--prompt-template", "auto", "--temperature", "0", *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_chat_through_stdin_on_smollm2():
    out = _chat("What is the capital of France? Answer in one word.\n\nRESET\n\nSay hello.\n\nEXIT\n",
                "--max-new-tokens", "40")
    assert out.returncode == 0, out.stderr[-2000:]
    answers = out.stdout.split(PROMPT.strip())
    assert "Paris" in answers[1]
    assert "<|im_end|>" not in out.stdout and "<|im_start|>" not in out.stdout  # stopped at the end of turn
    assert RESET_MESSAGE in answers[2]
    assert len(answers) == 5  # four prompts answered, then EXIT


@pytest.mark.slow
def test_lagent_on_smollm2_does_not_crash(tmp_path):
    out = _chat("What is 12 times 7?\n\n", "--lagent", "--max-new-tokens", "48", "--max-steps", "2",
                env={"SERPER_API_KEY": "x", "SERPER_BASE_URL": "http://127.0.0.1:9"})  # EOF exits
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[step 1]" in out.stdout


def test_bad_flags_are_one_line_errors(monkeypatch):
    monkeypatch.delenv("SERPER_API_KEY", raising=False)
    for args, needle in [(["--lagent"], "serper.dev"), (["--with-plugins", "calculate"], "moss_sft"),
                         (["--system", "a", "--system-template", "alpaca"], "--system-template"),
                         (["--bits", "3"], "--bits")]:
        out = subprocess.run([sys.executable, "-m", "tunesmith", "chat", MODEL, *args], capture_output=True,
                             text=True, timeout=TIMEOUT, input="")
        assert out.returncode == 2 and needle in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
