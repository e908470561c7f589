"""The plain loop of the end-to-end bench, as its own process: ``python -m tunesmith.bench.plain ...``.

It trains the model folder the way a user without tunesmith would (baseline.py: transformers + peft, bitsandbytes
for QLoRA, DeepSpeed when asked), on the same packed rows `tunesmith train` builds from the same data file (the
data stage makes them; the plain model sees only ``input_ids`` and ``labels``, so attention runs over the whole
row), with the same accumulation. Each optimizer step is timed (synchronised); the result is a JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from tunesmith.bench.baseline import baseline_loss, baseline_optimizer, prepare_baseline

ZERO2 = {"stage": 2, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 5e8,
         "allgather_bucket_size": 5e8}


def load_plain_model(folder: str, method: str, device: torch.device):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    on_cuda = device.type == "cuda"
    kwargs = {"dtype": torch.bfloat16 if on_cuda else torch.float32, "attn_implementation": "sdpa",
              "device_map": {"": device.index or 0} if on_cuda else None}
    if method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    return prepare_baseline(AutoModelForCausalLM.from_pretrained(folder, **kwargs), method)


def packed_rows(folder: str, data: str, method: str, overrides: list[str]) -> list[dict]:
    """The rows `tunesmith train` would train on (same recipe defaults, same overrides), in its order."""
    from tunesmith import models
    from tunesmith.config.load import validate
    from tunesmith.config.overrides import apply_overrides
    from tunesmith.data import build_train_dataset, make_dataloader

    cfg = validate(apply_overrides({"method": method, "model": {"path": folder}, "data": {"path": data}},
                                   overrides), "plain loop")
    tokenizer = models.load_tokenizer(folder)
    dataset, _ = build_train_dataset(cfg, tokenizer)
    loader = make_dataloader(dataset, cfg, seed=cfg.training.seed, epoch=0)
    return [{"input_ids": b["input_ids"], "labels": b["labels"]} for b in loader]


def run(args: argparse.Namespace) -> dict:
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.set_device(device)
    rows = packed_rows(args.model, args.data, args.method, args.set)
    model = load_plain_model(args.model, args.method, device)
    optimizer = baseline_optimizer(model)
    engine = None
    if args.deepspeed:
        import deepspeed

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        deepspeed.init_distributed(dist_backend="nccl" if on_cuda else "gloo")
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": args.accumulate,
                  "gradient_clipping": 1.0, "bf16": {"enabled": on_cuda}, "zero_optimization": ZERO2}
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                                       model_parameters=[p for p in model.parameters()
                                                                         if p.requires_grad])
    rates, losses = [], []
    sync = torch.cuda.synchronize if on_cuda else (lambda device: None)
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(args.steps):
        window = [rows[(step * args.accumulate + i) % len(rows)] for i in range(args.accumulate)]
        sync(device)
        start = time.perf_counter()
        total = 0.0
        for batch in window:
            batch = {k: v.to(device) for k, v in batch.items()}
            if engine is not None:
                loss = baseline_loss(engine, batch)
                engine.backward(loss)
                engine.step()
            else:
                loss = baseline_loss(model, batch)
                (loss / args.accumulate).backward()
            total += float(loss.detach())
        if engine is None:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync(device)
        seconds = time.perf_counter() - start
        rates.append(sum(int(b["input_ids"].numel()) for b in window) / seconds)
        losses.append(total / args.accumulate)
        print(f"plain step {step + 1}/{args.steps}: {rates[-1]:,.0f} tok/s, loss {losses[-1]:.4f}", flush=True)
    return {"tokens_per_s": rates, "losses": losses,
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if on_cuda else 0.0, "rows": len(rows)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tunesmith.bench.plain", description=__doc__)
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--method", choices=["lora", "qlora", "full"], required=True)
    parser.add_argument("--data", required=True, help="training data file (the recipe's format)")
    parser.add_argument("--set", nargs="*", default=[], help="the data overrides `tunesmith train` gets")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--accumulate", type=int, default=4)
    parser.add_argument("--deepspeed", action="store_true", help="DeepSpeed ZeRO-2 around the same model")
    parser.add_argument("--out", required=True, help="where the JSON result goes")
    args = parser.parse_args(argv)
    result = run(args)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(result, fh)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
