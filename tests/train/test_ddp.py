"""Plain DDP through the XTuner-style launcher: NPROC_PER_NODE=2 re-launches through torchrun (gloo on CPU);
only rank 0 writes; a resumed DDP run reproduces the uninterrupted one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import yaml
from safetensors.torch import load_file

from tests.timeouts import TIMEOUT


def _run(cfg_file, work, *extra):
    env = dict(os.environ, NPROC_PER_NODE="2", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PORT", "NNODES"):
        env.pop(k, None)
    done = subprocess.run([sys.executable, "-m", "tunesmith", "train", str(cfg_file), "--work-dir", str(work),
                           "--no-progress", *extra], env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def test_ddp_two_processes_and_resume(make_cfg, tmp_path):
    cfg = make_cfg(training={"max_steps": 4, "save_steps": 2}, evaluation={"inputs": []})
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")), encoding="utf-8")
    out = _run(cfg_file, tmp_path / "full")
    assert "torch.distributed.run" in out and "DDP x2" in out
    assert out.count("done: 4 steps") == 1  # rank 0 alone reports
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # one writer, no duplicate lines
    by_step = {json.loads((p / "meta.json").read_text())["step"]: p.name for p in (tmp_path / "full").glob("*.pth")}
    final, middle = by_step[4], by_step[2]  # iter_N.pth or epoch_N.pth, wherever the epochs end
    state = json.loads((tmp_path / "full" / final / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and len(state["rng"]) == 2

    shutil.copytree(tmp_path / "full", tmp_path / "resumed", ignore=shutil.ignore_patterns(final, "last_checkpoint"))
    _run(cfg_file, tmp_path / "resumed", "--resume", str(tmp_path / "resumed" / middle))
    a = load_file(str(tmp_path / "full" / final / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / final / "adapter_model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_ddp_validation_on_pairs_scores_every_held_out_pair_once(make_cfg, tmp_path):
    """Preference pairs (shared prompts, the CPU attention loop) under DDP: the held-out numbers before the first
    step are the single process's, so every held-out pair is scored exactly once across the two ranks."""
    from tunesmith.train import train

    rows = [{"prompt": f"question {i}: say something", "chosen": f"good answer {i % 5} yes",
             "rejected": f"bad {i % 3} no no"} for i in range(21)]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = make_cfg(data={"path": str(pairs), "format": "preference", "validation": 0.35},
                   training={"objective": "dpo", "max_steps": 1}, evaluation={"inputs": [], "every_n_steps": 1})
    cfg_file = tmp_path / "pairs.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")), encoding="utf-8")
    out = _run(cfg_file, tmp_path / "ddp")
    assert "DDP x2" in out and "shared prompts:" in out
    train(cfg, work_dir=tmp_path / "one", progress=False)

    def before_training(work):
        return next(json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()
                    if json.loads(x)["step"] == 0)

    ddp, one = before_training(tmp_path / "ddp"), before_training(tmp_path / "one")
    assert ddp["val_preference_accuracy"] == one["val_preference_accuracy"]
    assert abs(ddp["val_preference_margin"] - one["val_preference_margin"]) <= 1e-5
    assert abs(ddp["val_logp_chosen"] - one["val_logp_chosen"]) <= 1e-4
