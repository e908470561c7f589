"""Run by test_deepspeed.py in a fresh process per training (DeepSpeed keeps process-wide state):
`full` trains 4 steps with a ZeRO stage (checkpoints at 2 and 4); `resume` continues a copy from step 2;
`eager` / `compiled` train 4 steps without dropout, with eager or compiled decoder layers (from a JSON file)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from tests.train.conftest import tiny_config
from tunesmith.train import train
from tunesmith.train.distributed import deepspeed_config_path

mode, stage, model_dir, data_file, out = (
    sys.argv[1],
    sys.argv[2],
    Path(sys.argv[3]),
    Path(sys.argv[4]),
    Path(sys.argv[5]),
)
if stage == "deepspeed_zero2":
    # the named file with small buckets (also covers --deepspeed FILE.json): DeepSpeed's default 5e8-element ZeRO-2
    # buckets take ~25 s to allocate on a CPU, for a model of a few thousand trainable parameters
    ds = json.loads(deepspeed_config_path(stage).read_text())
    ds["zero_optimization"].update(reduce_bucket_size=1_000_000, allgather_bucket_size=1_000_000)
    out.mkdir(parents=True, exist_ok=True)
    (out / "deepspeed_zero2_small_buckets.json").write_text(json.dumps(ds))
    stage = str(out / "deepspeed_zero2_small_buckets.json")
cfg = tiny_config(
    model_dir,
    data_file,
    out / "cache",
    training={"max_steps": 4, "save_steps": 2},
    distributed={"deepspeed": stage},
    evaluation={"inputs": ["hello"], "every_n_steps": 2, "max_new_tokens": 4},
)
if mode in ("eager", "compiled"):  # without dropout: compiled graphs draw their masks from another generator
    cfg = tiny_config(model_dir, data_file, out / "cache", training={"max_steps": 4}, distributed={"deepspeed": stage},
                      lora={"dropout": 0.0}, evaluation={"inputs": []}, speed={"compile": "on" if mode == "compiled"
                                                                                  else "off"})
    result = train(cfg, work_dir=out / mode, progress=False)
elif mode == "full":
    result = train(cfg, work_dir=out / "full", progress=False)
else:
    shutil.copytree(out / "full", out / "resumed", ignore=shutil.ignore_patterns("iter_4.pth", "last_checkpoint"))
    result = train(cfg, work_dir=out / "resumed", resume=str(out / "resumed" / "iter_2.pth"), progress=False)
print("RESULT " + json.dumps({"losses": result.losses}))
