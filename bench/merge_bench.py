"""Merge benchmark: `tunesmith convert merge` vs peft `merge_and_unload` + `save_pretrained`, in one run.

Builds a random Llama-shaped model (default ~1.1 B parameters, TinyLlama's shapes, bf16, 2 GB safetensors
shards) and a random LoRA r64 adapter on every linear layer (PEFT's saved layout, fp16 as pth_to_hf writes
it), then runs each merge in its own subprocess and reports wall time and peak RSS:

- tunesmith: `python -m tunesmith convert merge BASE ADAPTER OUT --max-shard-size 2GB --device cpu`
- peft:      AutoModelForCausalLM.from_pretrained(BASE, dtype=bf16) -> PeftModel.from_pretrained(ADAPTER)
             -> merge_and_unload() -> save_pretrained(OUT, max_shard_size="2GB")

Peak RSS is the child's own ru_maxrss (os.wait4), cross-checked by psutil polling. Afterwards a few output
tensors of both are compared, and everything is deleted.

    python bench/merge_bench.py [--layers 22] [--dtype bf16] [--device cpu] [--workdir /tmp] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SHAPES = dict(hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=32000)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# torch is imported only in the helper subprocesses (building, comparing): a child's ru_maxrss includes the
# memory of the process it was forked from, so the measuring parent must stay small.


# ------------------------------------------------------------------------------------------ fixtures
def layer_shapes(i: int, s: dict) -> dict[str, tuple[int, ...]]:
    h, m, d = s["hidden"], s["intermediate"], s["hidden"] // s["heads"]
    kv = s["kv_heads"] * d
    p = f"model.layers.{i}."
    return {
        p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
        p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
        p + "mlp.gate_proj.weight": (m, h), p + "mlp.up_proj.weight": (m, h), p + "mlp.down_proj.weight": (h, m),
        p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
    }


def build_base(folder: Path, layers: int, dtype_name: str, shard_bytes: int) -> int:
    """Random weights written shard by shard with the safetensors library (+ config.json); returns #params."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    s = SHAPES
    dtype = getattr(torch, dtype_name)
    folder.mkdir(parents=True)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (s["vocab"], s["hidden"])}
    for i in range(layers):
        shapes.update(layer_shapes(i, s))
    shapes["model.norm.weight"] = (s["hidden"],)
    shapes["lm_head.weight"] = (s["vocab"], s["hidden"])
    elem = torch.empty((), dtype=dtype).element_size()
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for name, shape in shapes.items():
        n = torch.Size(shape).numel() * elem
        if shards[-1] and size + n > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = shape
        size += n
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard.items():
            t = torch.randn(shape, generator=gen) * (0.02 if len(shape) == 2 else 0.1)
            tensors[name] = (t + 1.0 if len(shape) == 1 else t).to(dtype)
            weight_map[name] = fname
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        del tensors
    total = sum(torch.Size(v).numel() for v in shapes.values())
    index = {"metadata": {"total_size": total * elem}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                num_hidden_layers=layers, num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                tie_word_embeddings=False, dtype=dtype_name).save_pretrained(folder)
    return total


def build_adapter(folder: Path, layers: int, r: int = 64, alpha: int = 16) -> int:
    """A random LoRA adapter on all linear layers in PEFT's saved layout (fp16, as pth_to_hf writes)."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(layers):
        for name, shape in layer_shapes(i, SHAPES).items():
            module = name[: -len(".weight")]
            if module.rsplit(".", 1)[-1] not in TARGETS:
                continue
            out_f, in_f = shape
            key = f"base_model.model.{module}"
            tensors[key + ".lora_A.weight"] = (torch.randn(r, in_f, generator=gen) / in_f**0.5).half()
            tensors[key + ".lora_B.weight"] = (torch.randn(out_f, r, generator=gen) * 0.01).half()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(r=r, lora_alpha=alpha, target_modules=list(TARGETS), lora_dropout=0.0,
               task_type="CAUSAL_LM").save_pretrained(str(folder))
    return sum(t.numel() for t in tensors.values())


# ------------------------------------------------------------------------------------------ measuring
PEFT_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out, dtype = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
model = PeftModel.from_pretrained(model, adapter)
model = model.merge_and_unload()
model.save_pretrained(out, max_shard_size="2GB", safe_serialization=True)
"""


def measure(cmd: list[str], label: str) -> dict:
    """Run cmd; wall time, peak RSS from the kernel (ru_maxrss of this child) and from psutil polling."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = {"rss": 0}
    done = threading.Event()

    def poll() -> None:
        try:
            p = psutil.Process(proc.pid)
            while not done.is_set():
                rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                peak["rss"] = max(peak["rss"], rss)
                time.sleep(0.02)
        except psutil.Error:
            pass

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    done.set()
    poller.join()
    if proc.returncode != 0:
        sys.stdout.write(output.decode(errors="replace")[-4000:])
        raise SystemExit(f"{label} failed with exit code {proc.returncode}")
    return {"label": label, "wall_s": wall, "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9,
            "polled_peak_rss_gb": peak["rss"] / 1e9, "output_tail": output.decode(errors="replace")[-300:]}


def compare_outputs(ours: Path, theirs: Path, names: list[str]) -> float:
    import torch  # noqa: F401
    from safetensors import safe_open

    def find(folder: Path, name: str) -> torch.Tensor:
        index = folder / "model.safetensors.index.json"
        file = json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"
        with safe_open(str(folder / file), framework="pt") as f:
            return f.get_tensor(name).float()

    return max((find(ours, n) - find(theirs, n)).abs().max().item() for n in names)


def helper(*args: str) -> dict:
    """Run this script's --helper mode in a subprocess; its last output line is JSON."""
    out = subprocess.run([sys.executable, __file__, "--helper", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"helper {args[0]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_helper(args: list[str]) -> None:
    kind, root = args[0], Path(args[1])
    if kind == "build":
        layers, dtype_name, rank = int(args[2]), args[3], int(args[4])
        n_params = build_base(root / "base", layers, dtype_name, 2 * 10**9)
        n_lora = build_adapter(root / "adapter", layers, r=rank)
        print(json.dumps({"params": n_params, "lora_params": n_lora}))
    else:
        names = args[2:]
        print(json.dumps({"max_abs_diff": compare_outputs(root / "ours", root / "peft", names)}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--helper":
        run_helper(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=22, help="decoder layers (22 = TinyLlama, ~1.1 B parameters)")
    ap.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="bf16")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--workdir", default=None, help="where to build the models (default: a temp folder)")
    ap.add_argument("--device", default="cpu", help="tunesmith's --device (peft's merge always runs on the CPU)")
    ap.add_argument("--keep", action="store_true", help="keep the folders")
    args = ap.parse_args()
    dtype_name = DTYPE_NAMES[args.dtype]

    root = Path(tempfile.mkdtemp(prefix="merge_bench-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        built = helper("build", str(root), str(args.layers), dtype_name, str(args.rank))
        n_params = built["params"]
        print(f"base: {n_params / 1e9:.2f} B parameters ({args.dtype}), adapter r{args.rank}: "
              f"{built['lora_params'] / 1e6:.1f} M parameters; built in {time.perf_counter() - t0:.0f} s", flush=True)

        ours = measure([sys.executable, "-m", "tunesmith", "convert", "merge", str(root / "base"),
                        str(root / "adapter"), str(root / "ours"), "--max-shard-size", "2GB", "--device", args.device],
                       f"tunesmith convert merge (--device {args.device})")
        print(f"{ours['label']}: {ours['wall_s']:.1f} s, peak RSS {ours['peak_rss_gb']:.2f} GB", flush=True)
        peft = measure([sys.executable, "-c", PEFT_SCRIPT, str(root / "base"), str(root / "adapter"),
                        str(root / "peft"), dtype_name], "peft merge_and_unload + save_pretrained")
        print(f"{peft['label']}: {peft['wall_s']:.1f} s, peak RSS {peft['peak_rss_gb']:.2f} GB", flush=True)

        probe = ["model.layers.0.self_attn.q_proj.weight", f"model.layers.{args.layers - 1}.mlp.down_proj.weight",
                 "model.embed_tokens.weight", "lm_head.weight"]
        diff = helper("compare", str(root), *probe)["max_abs_diff"]
        ratio = ours["peak_rss_gb"] / peft["peak_rss_gb"]
        speed = peft["wall_s"] / ours["wall_s"]
        print()
        print(f"| merge ({n_params / 1e9:.2f} B, {args.dtype}, LoRA r{args.rank} all linear, CPU) "
              f"| wall time | peak RSS (wait4) | peak RSS (psutil) |")
        print("|---|---|---|---|")
        for r in (ours, peft):
            print(f"| {r['label']} | {r['wall_s']:.1f} s | {r['peak_rss_gb']:.2f} GB "
                  f"| {r['polled_peak_rss_gb']:.2f} GB |")
        print(f"\npeak RSS ratio tunesmith / peft: {ratio:.2f} (goal < 0.33); speed-up {speed:.2f}x "
              f"(goal >= 1); max |ours - peft| on {len(probe)} probed tensors: {diff:.3g}")
        print(json.dumps({"params": n_params, "dtype": args.dtype, "rank": args.rank, "ours": ours, "peft": peft,
                          "rss_ratio": ratio, "speedup": speed, "max_abs_diff": diff}, default=str))
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
