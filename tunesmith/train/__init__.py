"""Training: the loop (loop.py), optimizer + schedule (optim.py), token-weighted loss (loss.py),
checkpoints (checkpoint.py), metrics files (metrics.py), the console and train.log (runlog.py), evaluation
prompts (eval_hook.py), DDP / DeepSpeed (distributed.py) and the torchrun launcher (launch.py).

    from tunesmith.config import load_config
    from tunesmith.train import train
    cfg, stem = load_config("my_config.yaml", ["training.max_steps=20"])
    result = train(cfg, work_dir=f"work_dirs/{stem}")          # resume="auto", deepspeed="deepspeed_zero2"
"""

from __future__ import annotations

from typing import Any

__all__ = ["TrainResult", "train"]


def __getattr__(name: str) -> Any:  # lazy: importing tunesmith.train must not import torch
    if name in __all__:
        from tunesmith.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'tunesmith.train' has no attribute {name!r}")
