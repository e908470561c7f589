"""Every command in the README and docs/ runs (see tests/docs/doc_commands.py for the substitutes)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docs.doc_commands import Command, bash_blocks, page_commands, parse_command
from tests.fixtures.tiny_models import make_tiny_internlm

ROOT = Path(__file__).resolve().parents[2]
PAGES = [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if bash_blocks(p)]
HUB_MODELS = {"internlm/internlm-chat-7b": "internlm-chat-7b"}  # hub ids the pages name -> stand-in folders
# CI-sized training: a few short samples, one micro-batch a step (the epochs of the recipe still complete, so
# the epoch_N.pth the pages name exist), short in-training answers
TRAIN_SMALL = ["data.max_length=256", "data.max_dataset_length=6", "training.accumulative_counts=1",
               "training.batch_size=1", "evaluation.max_new_tokens=8", "logging.tensorboard=false"]
CHAT_STDIN = "Hello\n\nEXIT\n"
# formats whose sample record (tunesmith.data.format_examples) has a longer prompt than TRAIN_SMALL's max_length
# leaves room for: the MSAgent tool preamble alone is about 840 tokens
LONG_RECORDS = {"msagent_react": 1024}


def _workbook(path: Path) -> None:
    """A small stand-in for MedInfo2019-QA-Medications.xlsx: same sheet and columns, invented rows."""
    from openpyxl import Workbook

    wb = Workbook()
    ws = wb.active
    ws.title = "DrugQA"
    ws.append(["Question", "Focus (Drug)", "Question Type", "Answer", "Section Title", "URL"])
    for i in range(12):
        ws.append([f"How often should I take medicine {i}?", f"drug {i}", "usage",
                   f"Take medicine {i} once a day with water, as your doctor prescribed.", "Dosage", ""])
    wb.save(path)


@pytest.fixture(scope="module")
def machine(tmp_path_factory):
    """The folder a reader works in, holding tiny stand-ins for what the pages assume is there."""
    home = tmp_path_factory.mktemp("reader")
    make_tiny_internlm(home / "internlm-chat-7b")
    _workbook(home / "MedInfo2019-QA-Medications.xlsx")
    (home / "examples").symlink_to(ROOT / "examples")
    return home


def _sample_data(home: Path, fmt: str) -> Path:
    """A local file in `fmt` for a config whose data.path is a hub dataset."""
    if fmt == "oasst1":
        return ROOT / "examples" / "data" / "oasst1_guanaco_eval.jsonl"
    from tunesmith.data.format_examples import FORMAT_EXAMPLES

    path = home / "_samples" / f"{fmt}.jsonl"
    path.parent.mkdir(exist_ok=True)
    path.write_text((json.dumps(FORMAT_EXAMPLES[fmt], ensure_ascii=False) + "\n") * 8, encoding="utf-8")
    return path


def _given_overrides(words: list[str]) -> list[str]:
    out, taking = [], False
    for word in words:
        if word in ("--set", "--cfg-options"):
            taking = True
        elif word.startswith("-"):
            taking = False
        elif taking and "=" in word:
            out.append(word)
    return out


def _train_words(words: list[str], home: Path) -> list[str]:
    """Small settings; a model / data the config names on the hub replaced by local stand-ins: edited into a
    config file (as the README tells the reader to do, so later `convert` commands see the same file), or
    given with --set for a recipe name."""
    import yaml

    from tunesmith.config import load_config

    config = words[2]
    cfg, _ = load_config(config, _given_overrides(words))
    local: dict[str, str] = {}
    if not cfg.model.path.startswith("builtin:") and not (home / cfg.model.path).exists():
        local["model.path"] = str(home / HUB_MODELS.get(cfg.model.path, "internlm-chat-7b"))
    if not (home / cfg.data.path).exists():
        local["data.path"] = str(_sample_data(home, cfg.data.format))
    extra = list(TRAIN_SMALL)
    if cfg.data.format in LONG_RECORDS:
        extra.append(f"data.max_length={LONG_RECORDS[cfg.data.format]}")
    if local and (home / config).is_file():
        data = yaml.safe_load((home / config).read_text(encoding="utf-8"))
        for key, value in local.items():
            section, name = key.split(".")
            data[section][name] = value
        (home / config).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    else:
        extra += [f"{key}={value}" for key, value in local.items()]
    return [*words, "--set", *extra]


def substituted(cmd: Command, home: Path) -> list[str]:
    """The command's words with the small substitutes (module docstring of doc_commands)."""
    words = [HUB_MODELS.get(w, w) for w in cmd.words]
    if words[1:2] == ["train"]:
        return _train_words(words, home)
    if words[1:2] == ["chat"]:
        return [*words, "--max-new-tokens", "8"]
    if words[1:2] == ["eval"]:
        return [*words, "--max-samples", "4", "--max-new-tokens", "8"]
    return words


def _run_tunesmith(argv: list[str], stdin: str) -> tuple[int, str]:
    from tunesmith.cli.main import main

    out = io.StringIO()
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                main(argv)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.stdin = old_stdin
    return code, out.getvalue()


def _shell(text: str, home: Path, env: dict[str, str]) -> tuple[int, str]:
    bin_dir = str(Path(sys.executable).parent)
    full_env = {**os.environ, **env, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    done = subprocess.run(["bash", "-c", text], cwd=home, env=full_env, capture_output=True, text=True,
                          timeout=900)
    return done.returncode, done.stdout + done.stderr


def run_command(cmd: Command, home: Path, monkeypatch) -> tuple[int, str]:
    for key, value in cmd.env.items():
        monkeypatch.setenv(key, value)
    if not cmd.is_tunesmith:
        return _shell(_shell_text(cmd), home, cmd.env)
    stdin = CHAT_STDIN
    if cmd.stdin_from:
        _, stdin = _shell(cmd.stdin_from, home, cmd.env)
    code, output = _run_tunesmith(substituted(cmd, home)[1:], stdin)
    if cmd.redirect:
        (home / cmd.redirect).write_text(output, encoding="utf-8")
    return code, output


def _shell_text(cmd: Command) -> str:
    import shlex

    text = shlex.join(cmd.words)
    return f"{text} > {shlex.quote(cmd.redirect)} 2>&1" if cmd.redirect else text


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_of_the_page_runs(page, machine, monkeypatch, tmp_path):
    commands = page_commands(page, ROOT)
    home = tmp_path / "home"
    shutil.copytree(machine, home, symlinks=True)
    monkeypatch.chdir(home)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SERPER_API_KEY", "docs-test")  # the agent's web search fails fast: nothing listens there
    monkeypatch.setenv("SERPER_BASE_URL", "http://127.0.0.1:9")
    ran, skipped = 0, []
    for cmd in commands:
        if cmd.skip:
            skipped.append(f"{cmd.where}: {cmd.skip}")
            continue
        code, output = run_command(cmd, home, monkeypatch)
        assert code == 0, f"{cmd.where}: `{cmd.text}` exited {code}:\n{output[-3000:]}"
        ran += 1
    assert ran, f"{page.name}: every command was skipped: {skipped}"
    print(f"{page.name}: {ran} commands ran, {len(skipped)} skipped:\n  " + "\n  ".join(skipped))


def test_the_readme_has_commands_to_run():
    assert ROOT / "README.md" in PAGES


def test_parse_command_reads_the_shell_forms_the_pages_use(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("intro\n```bash\n# a comment\nprintf 'hi\\n\\nEXIT\\n' | tunesmith chat ./merged  # ask\n"
                    "tunesmith convert pth_to_hf cfg.yaml \\\n    ./work/epoch_1.pth ./hf\n"
                    "NPROC_PER_NODE=2 tunesmith train cfg.yaml --deepspeed deepspeed_zero2\n"
                    "nohup tunesmith train cfg.yaml > train.log 2>&1 &\n```\n```text\nnot run\n```\n",
                    encoding="utf-8")
    chat, convert, multi, nohup = page_commands(page, tmp_path)
    assert chat.where == "page.md:4" and chat.words == ["tunesmith", "chat", "./merged"]
    assert chat.stdin_from == "printf 'hi\\n\\nEXIT\\n'" and chat.skip is None
    assert convert.where == "page.md:5" and convert.words[-2:] == ["./work/epoch_1.pth", "./hf"]
    assert multi.env == {"NPROC_PER_NODE": "2"} and multi.skip.startswith("needs GPUs")
    assert nohup.words == ["tunesmith", "train", "cfg.yaml"] and nohup.redirect == "train.log" and nohup.background
    assert parse_command("x:1", "tail -f train.log").skip == "follows a file forever"
    assert parse_command("x:1", "   # only a comment") is None
