"""Exact resume through the CLI: SIGKILL mid-epoch at a random step, `--resume auto`, same result; and
Ctrl-C saves and prints the resume command."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.timeouts import TIMEOUT, wait_for

ROOT = Path(__file__).resolve().parents[2]


def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TUNESMITH_DEBUG="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    env.pop("LOCAL_RANK", None)
    env.pop("NPROC_PER_NODE", None)
    return env


def _write_cfg(path, cfg):
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), allow_unicode=True), encoding="utf-8")
    return path


def _cmd(cfg_file, work, *extra):
    return [sys.executable, "-m", "tunesmith", "train", str(cfg_file), "--work-dir", str(work), "--no-progress",
            *extra]


def _steps_logged(work):
    try:
        lines = (work / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    return len([ln for ln in lines if ln.endswith("}")])


def _start_and_wait(cfg_file, work, step, sig):
    proc = subprocess.Popen(_cmd(cfg_file, work), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)

    def reached() -> bool:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        return _steps_logged(work) >= step

    wait_for(reached, f"training reaching step {step}", interval=0.02)
    assert proc.poll() is None, "the run ended before the signal: the test would prove nothing"
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, out


def _losses(work):
    return [json.loads(x)["loss"] for x in (work / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def resume_cfg(make_cfg, tmp_path):
    cfg = make_cfg(training={"max_epochs": 2, "save_steps": 2, "save_total_limit": 2},
                   evaluation={"every_n_steps": 5, "temperature": 0.7})  # sampling must not shift the RNG
    return _write_cfg(tmp_path / "tiny.yaml", cfg)


def test_sigkill_mid_epoch_then_resume_auto_is_exact(resume_cfg, tmp_path):
    ref = tmp_path / "ref"
    done = subprocess.run(_cmd(resume_cfg, ref), env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    total = len(_losses(ref))
    meta = json.loads((ref / "epoch_1.pth" / "meta.json").read_text())
    per_epoch = meta["step"]
    candidates = [s for s in range(3, total - 1) if s != per_epoch]  # mid-epoch steps
    kill_at = random.Random(time.time_ns()).choice(candidates)

    work = tmp_path / "killed"
    code, out = _start_and_wait(resume_cfg, work, kill_at, signal.SIGKILL)
    assert code == -signal.SIGKILL
    resumed = subprocess.run(_cmd(resume_cfg, work, "--resume", "auto"), env=_env(), capture_output=True,
                             text=True, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout, f"killed at {kill_at}: no checkpoint used?"

    a = load_file(str(ref / "epoch_2.pth" / "adapter_model.safetensors"))
    b = load_file(str(work / "epoch_2.pth" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, f"killed at step {kill_at}: max weight difference {worst}"
    la, lb = _losses(ref), _losses(work)
    assert len(la) == len(lb) == total
    assert max(abs(x - y) for x, y in zip(la, lb)) <= 1e-6, f"killed at step {kill_at}: loss curves differ"


def test_ctrl_c_saves_and_prints_resume_command(resume_cfg, tmp_path):
    work = tmp_path / "work"
    code, out = _start_and_wait(resume_cfg, work, 3, signal.SIGINT)
    assert code == 130, out[-3000:]
    assert "resume with:" in out and "--resume auto" in out and str(work) in out
    last = Path((work / "last_checkpoint").read_text().strip())
    step = json.loads((last / "meta.json").read_text())["step"]
    assert step >= 3 and f"training interrupted at step {step}" in out
    assert torch.isfinite(load_file(str(last / "adapter_model.safetensors"))[next(iter(
        load_file(str(last / "adapter_model.safetensors"))))]).all()


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit"])
def test_every_optimizer_saves_and_resumes_exactly(make_cfg, tmp_path, optimizer):
    """bitsandbytes' optimizers nest their quantization state in a dict: every tensor of it goes to safetensors,
    trainer_state.json holds plain numbers only, and the resumed steps repeat the uninterrupted ones. On a CUDA
    machine the same test runs on the GPU (the loop picks the device)."""
    if optimizer != "adamw":
        pytest.importorskip("bitsandbytes")
    from tunesmith.train import train

    cfg = make_cfg(training={"max_steps": 4, "save_steps": 2, "optimizer": optimizer, "save_total_limit": 4},
                   evaluation={"inputs": []})
    work = tmp_path / "work"
    full = train(cfg, work_dir=work, progress=False)
    saved = work / "iter_2.pth"
    json.loads((saved / "trainer_state.json").read_text())  # plain JSON, no tensors
    tensors = load_file(str(saved / "optimizer.safetensors"))
    assert tensors and all(k.startswith("state.") for k in tensors)
    resumed = train(cfg, work_dir=tmp_path / "again", resume=str(saved), progress=False)
    assert resumed.losses == full.losses[2:]
