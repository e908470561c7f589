"""Two CUDA GPUs through the XTuner-style launcher (NPROC_PER_NODE=2, nccl, bf16): plain DDP, DeepSpeed ZeRO-2
and ZeRO-3 see the same global batches, so their loss curves agree; single-GPU QLoRA trains too.
Run on the GPU machine (`pytest -m gpu tests/train`); skipped elsewhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.timeouts import TIMEOUT

pytestmark = pytest.mark.gpu


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _train(cfg, tmp_path, name, nproc, *extra):
    cfg_file = tmp_path / f"{name}.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")), encoding="utf-8")
    env = dict(os.environ, NPROC_PER_NODE=str(nproc), OMP_NUM_THREADS="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PORT", "NNODES"):
        env.pop(k, None)
    work = tmp_path / name
    done = subprocess.run([sys.executable, "-m", "tunesmith", "train", str(cfg_file), "--work-dir", str(work),
                           "--no-progress", *extra], env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.skipif(_gpus() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_ddp_and_zero_agree(make_cfg, tmp_path):
    pytest.importorskip("deepspeed")
    cfg = make_cfg(training={"max_steps": 6, "deterministic": False, "mixed_precision": "bf16"},
                   evaluation={"inputs": []})
    ddp = _train(cfg, tmp_path, "ddp", 2)
    zero2 = _train(cfg, tmp_path, "zero2", 2, "--deepspeed", "deepspeed_zero2")
    zero3 = _train(cfg, tmp_path, "zero3", 2, "--deepspeed", "deepspeed_zero3")
    print("losses ddp", ddp, "zero2", zero2, "zero3", zero3)
    assert len(ddp) == len(zero2) == len(zero3) == 6
    assert ddp[-1] < ddp[0]
    assert zero2 == pytest.approx(ddp, abs=0.05)  # bf16 autocast, different reduction order
    assert zero3 == pytest.approx(ddp, abs=0.05)


@pytest.mark.skipif(_gpus() < 1, reason="needs a CUDA GPU")
def test_one_gpu_qlora_bf16_trains(make_cfg, tmp_path):
    pytest.importorskip("bitsandbytes")
    cfg = make_cfg(method="qlora", model={"dtype": "bf16"},
                   training={"max_steps": 8, "deterministic": False, "mixed_precision": "bf16"},
                   evaluation={"inputs": []})
    losses = _train(cfg, tmp_path, "qlora", 1)
    print("losses qlora", losses)
    assert len(losses) == 8 and losses[-1] < losses[0]
