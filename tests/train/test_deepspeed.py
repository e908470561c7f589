"""DeepSpeed ZeRO-2 and ZeRO-3, single process on CPU (gloo): trains, saves the gathered adapter in our
checkpoint format, and resumes from it exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.timeouts import TIMEOUT

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[2]


def _run(mode, stage, model_dir, data_file, out):
    # CPU by name: the two-GPU ZeRO runs are in test_multi_gpu.py
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    done = subprocess.run([sys.executable, "-m", "tests.train.ds_worker", mode, stage, str(model_dir), str(data_file),
                           str(out)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])["losses"]


@pytest.mark.parametrize("stage", ["deepspeed_zero2", "deepspeed_zero3"])
def test_deepspeed_single_process_cpu(stage, train_model_dir, train_data_file, tmp_path):
    from safetensors.torch import load_file

    losses = _run("full", stage, train_model_dir, train_data_file, tmp_path)
    assert len(losses) == 4 and losses[-1] < losses[0]
    meta = json.loads((tmp_path / "full" / "iter_4.pth" / "meta.json").read_text())
    assert meta["zero_stage"] == int(stage[-1])
    assert meta["deepspeed"] == stage or meta["deepspeed"].endswith("deepspeed_zero2_small_buckets.json")
    resumed = _run("resume", stage, train_model_dir, train_data_file, tmp_path)
    assert resumed == pytest.approx(losses[2:], abs=1e-6)
    a = load_file(str(tmp_path / "full" / "iter_4.pth" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "iter_4.pth" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_compiled_layers_under_zero2_match_eager(train_model_dir, train_data_file, tmp_path):
    """ZeRO-1/2 partition optimizer state and gradients, not weights, so `compile auto` compiles there too: the
    losses are those of the eager layers (fp32 on the CPU: the compiler's own rounding only)."""
    eager = _run("eager", "deepspeed_zero2", train_model_dir, train_data_file, tmp_path)
    compiled = _run("compiled", "deepspeed_zero2", train_model_dir, train_data_file, tmp_path)
    assert compiled == pytest.approx(eager, abs=1e-4)
