"""Kill `tunesmith train` at random moments, some inside a checkpoint write, resume each time with
`--resume auto`, and compare the final weights with an uninterrupted run's, bit for bit.

    python bench/kill_resume.py --kills 20            # about 4 minutes on two CPU cores

The run trains the test suite's tiny Llama on the CPU (deterministic kernels), saving every step; the
environment variable TUNESMITH_TEST_SAVE_DELAY stretches each save so that a good share of the kills land while a
checkpoint is being written. Prints one line per kill (where it landed) and the verdict; exit code 1 on a
difference.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def config(tmp: Path, steps: int) -> Path:
    import yaml

    from tests.fixtures.tiny_models import make_tiny_llama

    model = make_tiny_llama(tmp / "model")
    data = tmp / "data.jsonl"
    rng = random.Random(0)
    words = "the model learns to answer questions about data and code with care".split()
    data.write_text("".join(json.dumps({"conversation": [{"input": " ".join(rng.choices(words, k=6)),
                                                          "output": " ".join(rng.choices(words, k=5))}]}) + "\n"
                            for _ in range(200)), encoding="utf-8")
    cfg = {"method": "lora", "model": {"path": str(model), "dtype": "fp32"},
           "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
           "data": {"path": str(data), "format": "conversation", "prompt_template": "auto", "max_length": 64,
                    "cache_dir": str(tmp / "cache")},
           "training": {"max_steps": steps, "batch_size": 2, "accumulative_counts": 2, "lr": 3e-3, "save_steps": 1,
                        "save_total_limit": 3, "deterministic": True, "log_interval": 1,
                        "gradient_checkpointing": False},
           "evaluation": {"inputs": []}, "logging": {"tensorboard": False, "plot": False}}
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def command(cfg: Path, work: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "tunesmith", "train", str(cfg), "--work-dir", str(work), "--no-progress",
            *(["--resume", "auto"] if resume else [])]


def environment(delay: float) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TUNESMITH_TEST_SAVE_DELAY=str(delay))
    for key in ("WORLD_SIZE", "LOCAL_RANK", "NPROC_PER_NODE"):
        env.pop(key, None)
    return env


def logged_steps(work: Path) -> int:
    from tunesmith.train.metrics import read_metrics

    return max((r["step"] for r in read_metrics(work / "metrics.jsonl")), default=0)


def weights(work: Path, step: int) -> dict:
    from safetensors.torch import load_file

    return load_file(str(work / f"iter_{step}.pth" / "adapter_model.safetensors"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--save-delay", type=float, default=0.4, help="seconds each save lingers before its rename")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    rng = random.Random(args.seed if args.seed is not None else time.time_ns())
    with tempfile.TemporaryDirectory(prefix="tunesmith-kill-") as tmp_name:
        tmp = Path(tmp_name)
        cfg = config(tmp, args.steps)
        ref, work = tmp / "reference", tmp / "killed"
        done = subprocess.run(command(cfg, ref, False), env=environment(0), capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stdout[-2000:], done.stderr[-2000:])
            return 1
        in_write = 0
        for kill in range(1, args.kills + 1):
            before = logged_steps(work)
            proc = subprocess.Popen(command(cfg, work, True), env=environment(args.save_delay),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 60
            while logged_steps(work) <= before and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)  # wait for the first new step: every kill comes after some progress
            time.sleep(rng.uniform(0.0, 1.5))  # then inside a step or a save
            writing = any(p.name.startswith(".iter_") for p in work.glob(".*")) if work.exists() else False
            if proc.poll() is not None:
                print(f"kill {kill:2d}: the run had already finished")
                continue
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            in_write += writing
            last = (work / "last_checkpoint").read_text().strip() if (work / "last_checkpoint").exists() else "-"
            print(f"kill {kill:2d}: at step {logged_steps(work):3d}, "
                  f"{'during a checkpoint write' if writing else 'between saves':26s} "
                  f"last checkpoint {Path(last).name}", flush=True)
        done = subprocess.run(command(cfg, work, True), env=environment(0), capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stdout[-2000:], done.stderr[-2000:])
            return 1
        a, b = weights(ref, args.steps), weights(work, args.steps)
        same = a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
        print(f"{args.kills} kills, {in_write} during a checkpoint write; final weights "
              f"{'bit-equal to' if same else 'DIFFERENT from'} the uninterrupted run's")
        return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
