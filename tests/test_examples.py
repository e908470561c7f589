"""The scripts under examples/: examples/cli_demo.py quits on an empty line and on Ctrl-D (end of input);
examples/quickstart.sh runs every stage, its data reads, and the README states its defaults."""

from __future__ import annotations

import importlib.util
import os
import re
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


# --- examples/quickstart.sh and the identity data it trains on ----------------------------------------------------

QUICKSTART = ROOT / "examples" / "quickstart.sh"
IDENTITY = ROOT / "examples" / "data" / "identity.jsonl"


def _default(name: str) -> str:
    """The default the quick-start script gives an environment variable: NAME=${NAME:-default}."""
    found = re.search(rf"^{name}=\$\{{{name}:-([^}}]+)\}}$", QUICKSTART.read_text(encoding="utf-8"), re.M)
    assert found, f"{QUICKSTART} sets no default for {name}"
    return found.group(1)


def test_identity_data_reads_with_the_new_name_filled_in():
    from tunesmith.data.readers import read_records

    records, stats = read_records(IDENTITY, "openai", split=None, strict=True)
    assert len(records) == 91 and not stats.malformed
    turns = [turn for record in records for turn in record.turns]
    assert len(turns) == 91 and all(t.input.strip() and t.output.strip() for t in turns)
    text = IDENTITY.read_text(encoding="utf-8")
    assert "{{" not in text and "}}" not in text  # the upstream placeholders {{name}} / {{author}} are filled in
    assert sum("Tunesmith Assistant" in t.output for t in turns) >= 70
    assert sum("the tunesmith quick-start" in t.output for t in turns) >= 60
    assert not re.search(r"[\u3400-\u9fff]", text)  # the Chinese records are in English here (data/README.md)
    assert any(t.input == "Who are you?" for t in turns)  # the question the quick-start asks in chat


def test_quickstart_readme_states_the_scripts_defaults():
    steps, samples = _default("STEPS"), _default("EVAL_SAMPLES")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    script = QUICKSTART.read_text(encoding="utf-8")
    paragraph = readme[readme.index("The first command runs `examples/quickstart.sh`"):]
    paragraph = paragraph[:paragraph.index("\n\n")]
    assert f"{steps} LoRA steps" in paragraph and f"work/iter_{steps}.pth" in paragraph
    assert f"STEPS (default {steps}" in script and f"EVAL_SAMPLES (default {samples}" in script
    # the split the script makes holds out as many records as the eval scores by default
    assert "--ratio 0.8" in script and round(91 * 0.2) == int(samples)


@pytest.mark.slow
def test_quickstart_runs_end_to_end_in_short(smollm2_path, tmp_path):
    """The script itself with 2 steps and 2 held-out questions: every stage runs, says what it does, and leaves
    what the README lists (a minute or two on 2 idle CPU cores)."""
    out = tmp_path / "qs"
    env = {**os.environ, "STEPS": "2", "EVAL_SAMPLES": "2", "QUICKSTART_DIR": str(out)}
    run = subprocess.run(["bash", str(QUICKSTART)], capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    headers = re.findall(r"^=== \[\d+:\d\d\] (.+)$", run.stdout, re.M)
    assert len(headers) == 9 and headers[-1] == "done", headers
    assert "fine-tune: LoRA, 2 steps" in run.stdout
    assert "evaluation at step 0" in run.stdout and "evaluation at step 2" in run.stdout
    assert (out / "work" / "last_checkpoint").read_text().strip().endswith("iter_2.pth")
    for path in ("work/iter_2.pth", "work/loss.png", "hf/adapter_config.json", "merged/config.json",
                 "eval/report.md", "identity-train.jsonl", "identity-test.jsonl", "smollm2-tunesmith.gguf",
                 "Modelfile"):
        assert (out / path).exists(), path
    assert len((out / "identity-test.jsonl").read_text().splitlines()) == 18
    assert "2 conversations" in (out / "eval" / "report.md").read_text()
