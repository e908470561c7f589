"""Diagnosis, not a claim: where one DPO micro-batch's time goes in the product's own module on a GPU.

Writes (or reuses) the e2e bench's random-weight model folder and its 2 x 1,024-token pairs, loads them exactly as
`tunesmith train` does (recipe internlm_chat_7b_lora_oasst1_e3 with training.objective dpo), checkpoints every layer
whole (what the @trl row's plan chose), then times each (synchronised), median of 5 after 3 warm-ups:

    reference (adapter off, compiled) | reference (adapter off, eager) | no-grad forward (adapter on)
    policy forward + backward (reference given) | the whole DPO micro-batch (reference each time)

    python bench/preference_phases.py [--work /tmp/bench_e2e] [--tokenizer .gpu/tokenizer]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/bench_e2e")
    ap.add_argument("--tokenizer", default=".gpu/tokenizer")
    ap.add_argument("--shape", default="internlm-7b", help="a tunesmith.bench.shapes name (tiny: a CPU smoke run)")
    args = ap.parse_args()

    from tunesmith.bench.e2e import BUNDLED_DATA, write_model_folder
    from tunesmith.bench.pairs import write_pairs
    from tunesmith.config import load_config
    from tunesmith.models import load_tokenizer
    from tunesmith.models.fast import eager_only, set_checkpointed_layers
    from tunesmith.models.fast.lora import adapter_off
    from tunesmith.train.distributed import setup_distributed
    from tunesmith.train.preference import objective_module
    from tunesmith.train.setup import build_data, load_model
    from tunesmith.train.step import autocast_for, to_device

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    folder = write_model_folder(args.shape, work / f"model-{args.shape}", args.tokenizer, 2048)
    pairs = work / "pairs-1024.jsonl"
    if not pairs.exists():
        write_pairs(pairs, load_tokenizer(folder), source=BUNDLED_DATA, pairs=16)
    cfg, _ = load_config("internlm_chat_7b_lora_oasst1_e3", [
        f"model.path={folder}", f"data.path={pairs}", "data.format=preference", "training.objective=dpo",
        "data.max_length=1024", "data.prompt_template=internlm_chat", "evaluation.inputs=[]",
        f"data.cache_dir={work}/phase-cache", "training.batch_size=1"])
    env = setup_distributed(deepspeed=False, timeout_minutes=30)
    tokenizer = load_tokenizer(folder)
    data = build_data(cfg, tokenizer, env, progress=False, printer=print)
    precision = "bf16" if env.device.type == "cuda" else "fp32"
    model, fast = load_model(cfg, folder, env, precision)
    print(fast.describe())
    module = objective_module(model, cfg, fast.loss_options())
    set_checkpointed_layers(model, 0)
    batch = to_device(next(iter(data.loader_for(0))), env.device)
    tokens = int(batch["input_ids"].numel())
    with torch.no_grad(), adapter_off(model), autocast_for(precision, env.device):
        reference = module.sequence_logps(batch)[0]
    given = {**batch, "reference_logps": reference.detach()}

    def ref_compiled():
        with torch.no_grad(), adapter_off(model), autocast_for(precision, env.device):
            module.sequence_logps(batch)

    def ref_eager():
        with eager_only(), torch.no_grad(), adapter_off(model), autocast_for(precision, env.device):
            module.sequence_logps(batch)

    def nograd_adapter_on():
        with torch.no_grad(), autocast_for(precision, env.device):
            module.sequence_logps(batch)

    def policy_step():
        with autocast_for(precision, env.device):
            loss, _ = module(given)
        loss.backward()
        model.zero_grad(set_to_none=True)

    def whole_step():
        with autocast_for(precision, env.device):
            loss, _ = module(batch)
        loss.backward()
        model.zero_grad(set_to_none=True)

    def whole_step_kept():
        set_checkpointed_layers(model, 10**6)
        whole_step()

    rows = []
    for name, fn in [("reference, adapter off, compiled", ref_compiled), ("reference, adapter off, eager", ref_eager),
                     ("no-grad forward, adapter on", nograd_adapter_on),
                     ("policy fwd+bwd, reference given", policy_step), ("DPO micro-batch, reference each time",
                                                                       whole_step),
                     ("same, every layer keeps activations", whole_step_kept)]:
        times = []
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        for i in range(8):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            began = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if i >= 3:
                times.append((time.perf_counter() - began) * 1000)
        module.take_stats()
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        rows.append((name, statistics.median(times), peak))
    print(f"\n== one micro-batch of {tokens} tokens (one pair), every layer checkpointed whole; median ms of 5 ==")
    for name, ms, peak in rows:
        print(f"{name:42s} {ms:9.1f} ms  {tokens / ms * 1000:9.0f} tok/s  peak {peak:6.2f} GiB")


if __name__ == "__main__":
    main()
