"""Issue 4's two-GPU check: a random-initialised 1.1B Llama (TinyLlama's shape) fine-tuned in full with
`tunesmith train` on one GPU and with `NPROC_PER_NODE=2 ... --deepspeed deepspeed_zero2`, tokens/s per GPU
compared, then the ZeRO-2 checkpoint converted with `convert pth_to_hf`. Run on a two-GPU machine:

    python bench/zero2_scaling.py --out /tmp/z2     (prints a small table; needs deepspeed)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_model(folder: Path, smoke: bool) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.fixtures.tiny_models import _llama_tokenizer

    tok = _llama_tokenizer()  # a small offline BPE; ids stay far below the 32k vocabulary
    shape = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4) if smoke else
             dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32))
    cfg = LlamaConfig(vocab_size=32000, **shape, num_key_value_heads=4, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def train(out: Path, model: Path, name: str, nproc: int, steps: int, *extra: str) -> dict:
    import yaml

    cfg = {"method": "full", "model": {"path": str(model), "dtype": "bf16"},
           "data": {"path": str(ROOT / "examples/data/oasst1_guanaco_eval.jsonl"), "format": "oasst1",
                    "prompt_template": "auto", "max_length": 2048, "cache_dir": str(out / "cache")},
           "training": {"max_steps": steps, "batch_size": 1, "accumulative_counts": 4, "lr": 1e-4,
                        "log_interval": 1, "save_epochs": False, "save_steps": steps},
           "evaluation": {"inputs": []}, "logging": {"tensorboard": False, "plot": True}}
    cfg_file = out / f"{name}.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, NPROC_PER_NODE=str(nproc))
    work = out / name
    done = subprocess.run([sys.executable, "-m", "tunesmith", "train", str(cfg_file), "--work-dir", str(work),
                           "--no-progress", *extra], env=env, capture_output=True, text=True)
    if done.returncode:
        print(done.stdout[-2000:], done.stderr[-4000:])
        raise SystemExit(f"{name} failed")
    rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    speed = statistics.median(r["tokens_per_s"] for r in rows[2:]) if len(rows) > 2 else float("nan")
    return {"name": name, "gpus": nproc, "tok_s": speed, "tok_s_per_gpu": speed / nproc,
            "mem_gb": max(r.get("memory_gb", 0) for r in rows), "first_loss": rows[0]["loss"],
            "last_loss": rows[-1]["loss"], "cfg": cfg_file, "work": work}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("/tmp/zero2_scaling"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="tiny shape, CPU: checks the plumbing only")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = build_model(args.out / "llama-1.1b-random", args.smoke)
    runs = [train(args.out, model, "one_gpu", 1, args.steps),
            train(args.out, model, "zero2_x2", 2, args.steps, "--deepspeed", "deepspeed_zero2")]
    ckpt = (runs[1]["work"] / "last_checkpoint").read_text().strip()
    conv = subprocess.run([sys.executable, "-m", "tunesmith", "convert", "pth_to_hf", str(runs[1]["cfg"]), ckpt,
                           str(args.out / "hf")], capture_output=True, text=True)
    print(conv.stdout[-600:], conv.stderr[-1500:] if conv.returncode else "")
    print(f"\n1.1B random Llama, full fine-tuning, seq 2048 packed, batch 1 x 4 per GPU, {args.steps} steps")
    print(f"{'run':<10} {'GPUs':>4} {'tok/s':>9} {'tok/s/GPU':>10} {'peak GiB':>9} {'loss first->last':>18}")
    for r in runs:
        print(f"{r['name']:<10} {r['gpus']:>4} {r['tok_s']:>9,.0f} {r['tok_s_per_gpu']:>10,.0f} {r['mem_gb']:>9.1f} "
              f"{r['first_loss']:>8.3f} -> {r['last_loss']:.3f}")
    print(f"scaling: {runs[1]['tok_s'] / runs[0]['tok_s']:.2f}x with 2 GPUs; "
          f"pth_to_hf of the ZeRO-2 checkpoint: {'ok' if conv.returncode == 0 else 'FAILED'}")


if __name__ == "__main__":
    main()
