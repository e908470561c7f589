"""The shell commands of the README and docs/, as a reader would type them, made small enough for CI.

Convention for the pages: a fenced block tagged `bash` holds commands to run, in order, in one folder (the
state carries from block to block, as for a reader following the page); output excerpts go in `text` blocks,
the set-up commands in untagged blocks. Each command is run as written, with "small substitutes" appended:

- the files the pages assume (./internlm-chat-7b, the MedInfo2019 workbook) exist as tiny stand-ins;
- `tunesmith train` gets a few `--set` overrides (tiny data, short sequences), plus model.path / data.path when
  the config points at a hub id that cannot be reached here;
- `chat` gets a question and EXIT on stdin and a short answer cap, `eval` a few samples.

What cannot run here (several GPUs, DeepSpeed, a server that never returns, a pip install) is skipped with
its reason, and the test reports the reasons.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

FENCE = re.compile(r"^```(\S*)\s*$")

# (pattern on the command text, reason it is not run here)
SKIPS = [
    (re.compile(r"--deepspeed|NPROC_PER_NODE=|NNODES=|torchrun"), "needs GPUs (DeepSpeed / several processes)"),
    (re.compile(r"^(tunesmith )?(serve|web)\b|^tunesmith (serve|web)\b"), "starts a server (tests/serve cover it)"),
    (re.compile(r"^tunesmith bench\b"), "a GPU benchmark"),
    (re.compile(r"^(pip|python3? -m (pip|venv))\b|^\. \.venv|^source\b"), "installs software"),
    (re.compile(r"^tail -f\b"), "follows a file forever"),
    (re.compile(r"^(cd|export)\b"), "shell state (the test keeps one folder and sets the environment itself)"),
    (re.compile(r"^(nvidia-smi|watch)\b"), "needs a GPU / runs forever"),
    (re.compile(r"^(apt|apt-get|sudo)\b"), "system packages"),
]


@dataclass
class Command:
    where: str  # file:line of the command's first line
    text: str  # the command as written (continuation lines joined)
    env: dict[str, str] = field(default_factory=dict)  # VAR=value words in front of it
    words: list[str] = field(default_factory=list)  # the command's own words (after the env prefix)
    stdin_from: str | None = None  # the shell command piped into it, if any
    background: bool = False  # written with a trailing `&`
    redirect: str | None = None  # `> file` target (output written there)
    skip: str | None = None

    @property
    def is_tunesmith(self) -> bool:
        return bool(self.words) and self.words[0] == "tunesmith"


def bash_blocks(path: Path) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of every ```bash block of a markdown page."""
    blocks, current, start, tag = [], None, 0, ""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        match = FENCE.match(line.strip())
        if match and current is None:
            current, start, tag = [], number + 1, match.group(1)
        elif match and current is not None and not match.group(1):
            if tag in ("bash", "sh", "shell"):
                blocks.append((start, current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def _logical_lines(start: int, lines: list[str]) -> list[tuple[int, str]]:
    out, pending, first = [], "", start
    for offset, line in enumerate(lines):
        if not pending:
            first = start + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((first, pending + line))
        pending = ""
    if pending:
        out.append((first, pending))
    return out


def parse_command(where: str, text: str) -> Command | None:
    words = shlex.split(text, comments=True)
    if not words:
        return None
    text = shlex.join(words)
    cmd = Command(where, text)
    stdin_from = None
    if "|" in words:
        bar = words.index("|")
        stdin_from, words = shlex.join(words[:bar]), words[bar + 1:]
    if words and words[-1] == "&":
        cmd.background, words = True, words[:-1]
    if words and words[0] == "nohup":
        words = words[1:]
    while len(words) >= 2 and words[-1] == "2>&1":
        words = words[:-1]
    if len(words) >= 2 and words[-2] == ">":
        cmd.redirect, words = words[-1], words[:-2]
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        key, _, value = words[0].partition("=")
        cmd.env[key] = value
        words = words[1:]
    cmd.words, cmd.stdin_from = words, stdin_from
    check = " ".join(f"{k}={v}" for k, v in cmd.env.items()) + " " + shlex.join(words)
    for pattern, reason in SKIPS:
        if pattern.search(check.strip()) or pattern.search(text):
            cmd.skip = reason
            break
    return cmd


def page_commands(path: Path, root: Path) -> list[Command]:
    commands = []
    for start, lines in bash_blocks(path):
        for number, text in _logical_lines(start, lines):
            cmd = parse_command(f"{path.relative_to(root)}:{number}", text)
            if cmd is not None:
                commands.append(cmd)
    return commands
