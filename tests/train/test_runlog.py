"""The run's log for people: `nohup tunesmith train CFG > out 2>&1 &` then `tail -f out` shows plain step lines
with ETA as they happen, and work_dir/train.log holds the same lines (started anew, appended on resume)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from tests.timeouts import TIMEOUT, wait_for
from tunesmith.train import train
from tunesmith.train.runlog import step_line

ROOT = Path(__file__).resolve().parents[2]
STEP = re.compile(r"^step (\d+)/(\d+) epoch \d+ loss \d+\.\d{4} lr \d\.\d{3}e[-+]\d\d grad_norm \d+\.\d{4} "
                  r"tok/s \d+ mem \d+\.\d\dGiB elapsed \d+:\d\d:\d\d ETA \d+:\d\d:\d\d$")


def _steps(text: str) -> list[int]:
    lines = [ln for ln in text.splitlines() if ln.startswith("step ")]
    assert all(STEP.match(ln) for ln in lines), lines
    return [int(STEP.match(ln).group(1)) for ln in lines]


def _is_subsequence(lines: list[str], of: list[str]) -> bool:
    rest = iter(of)
    return all(any(line == other for other in rest) for line in lines)


def test_step_line_numbers():
    values = {"loss": 1.23456, "lr": 2e-4, "grad_norm": 0.51234, "tokens_per_s": 1234.4, "memory_gb": 3.214}
    assert step_line(20, 200, 1, values, elapsed=62, eta_seconds=558) == (
        "step 20/200 epoch 1 loss 1.2346 lr 2.000e-04 grad_norm 0.5123 tok/s 1234 mem 3.21GiB "
        "elapsed 0:01:02 ETA 0:09:18")
    bare = step_line(1, 2, 1, {"loss": 1.0, "lr": 1e-3, "grad_norm": None}, elapsed=0, eta_seconds=None)
    assert "grad_norm" not in bare and "mem" not in bare and bare.endswith("tok/s 0 elapsed 0:00:00 ETA -:--:--")


def test_background_run_logs_plain_lines_live(make_cfg, tmp_path):
    """stdout to a file, as under nohup: plain step lines (every log_interval, with ETA) and the tokenizing start
    and end, written while the run is still going; no escape codes, no carriage returns; train.log the same."""
    cfg = make_cfg(training={"max_steps": 4, "log_interval": 2}, evaluation={"inputs": []})
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")), encoding="utf-8")
    work, out_file = tmp_path / "work", tmp_path / "out.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               TUNESMITH_TEST_SAVE_DELAY="3")  # the final save takes 3 s more after the last step line
    for name in ("PYTHONUNBUFFERED", "FORCE_COLOR", "TTY_COMPATIBLE", "WORLD_SIZE", "LOCAL_RANK", "NPROC_PER_NODE"):
        env.pop(name, None)
    with out_file.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "train", str(cfg_file), "--work-dir", str(work)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        def last_step_written():
            text = out_file.read_text(errors="replace")
            log = (work / "train.log").read_text() if (work / "train.log").exists() else ""
            if re.search(r"^step 4/4 ", text, re.M) and re.search(r"^step 4/4 ", log, re.M):
                # read before the checkpoint that follows the step is in place: written as it happened
                return "live" if not (work / "iter_4.pth").exists() else "only at the end"
            assert proc.poll() is None, text[-3000:]
            return None

        assert wait_for(last_step_written, "the last step line in the output", interval=0.02) == "live"
        assert proc.wait(timeout=TIMEOUT) == 0, out_file.read_text(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out_file.read_text(errors="replace")
    assert "\x1b" not in text and "\r" not in text, text[-3000:]
    assert _steps(text) == [1, 2, 4]  # the first, every log_interval, the last
    assert "tokenizing: started, 40 in all" in text and re.search(r"^tokenizing: done, 40 in \d+:\d\d:\d\d$", text,
                                                                   re.M)
    log = (work / "train.log").read_text().splitlines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d tunesmith train tiny", log[0]), log[0]
    for start in ("tokenizing: started", "records read 40", "fast paths on cpu", "work dir ", "method lora",
                  "step 4/4 ", f"saved {work / 'iter_4.pth'}"):
        assert any(line.startswith(start) for line in log), start
    assert log[-1].startswith("done: 4 steps in ") and log[-1].endswith(f"last checkpoint {work / 'iter_4.pth'}")
    assert _is_subsequence(log, text.splitlines())  # the console's lines, in the same order


def test_train_log_is_the_console_and_resume_appends(make_cfg, tmp_path, capsys):
    cfg = make_cfg(training={"max_steps": 4, "save_steps": 2, "save_total_limit": 4, "log_interval": 10},
                   evaluation={"inputs": ["hello world"], "every_n_steps": 10, "max_new_tokens": 2})
    work = tmp_path / "work"
    capsys.readouterr()
    train(cfg, work_dir=work, progress=False)
    first = (work / "train.log").read_text()
    assert first == capsys.readouterr().out  # without a bar, train.log is exactly what was printed
    assert _steps(first) == [1, 4] and "evaluation at step 0" in first and f"saved {work / 'iter_2.pth'}" in first

    train(cfg, work_dir=work, resume=str(work / "iter_2.pth"), progress=False)
    both = (work / "train.log").read_text()
    assert both.startswith(first)  # nothing of the first run is lost
    resumed = both[len(first):]
    assert resumed == capsys.readouterr().out
    assert resumed.splitlines()[0].endswith(f"tunesmith train {work.name} --resume {work / 'iter_2.pth'}")
    assert f"resuming from {work / 'iter_2.pth'} at step 2" in resumed
    assert _steps(resumed) == [3, 4] and "done: 4 steps" in resumed.splitlines()[-1]

    train(cfg, work_dir=work, progress=False)  # a fresh run into the same folder starts its log anew
    assert (work / "train.log").read_text() == capsys.readouterr().out
