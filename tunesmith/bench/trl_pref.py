"""The TRL baseline of the end-to-end bench's preference rows, as its own process:

    python -m tunesmith.bench.trl_pref --model F --data PAIRS --objective dpo|orpo --method lora|qlora|full \\
        --steps N --warmup W --json OUT.json

TRL's own trainer on the same model folder and the same pairs file `tunesmith train` gets, set up as TRL's
documentation sets it up: ``DPOTrainer`` (``loss_type`` sigmoid, ``beta`` 0.1; with LoRA the reference is the
model with its adapter switched off, TRL's default for peft, nothing precomputed; a full fine-tune gets TRL's
default second copy of the model as the reference) or ``ORPOTrainer`` (``trl.experimental.orpo`` in TRL 1.x, its
default ``beta``/lambda 0.1). The model is given to the trainer as a path with ``model_init_kwargs`` (bf16, sdpa;
for QLoRA TRL's ``quantization_config``: NF4, double quantization, bf16 compute); LoRA r 64, alpha 16, dropout 0.1
on every linear layer but the head (peft's ``all-linear``); gradient checkpointing, batch 1 pair, 4 micro-batches
a step, ``max_length`` 1024 per sequence (TRL 1.16 has no separate prompt / completion limits; a pair that would
be cut is an error, not a quiet truncation), lr 2e-4, no evaluation, no saving, ``report_to`` none; TRL's defaults
otherwise (among them ``disable_dropout=True``, which also zeroes the LoRA dropout).

Each pair is given to TRL as plain text rendered with the bench's prompt template (`tunesmith.bench.pairs.
pair_texts`), so TRL and `tunesmith train` see the same tokens; TRL appends EOS (ORPO also BOS) itself.

Measured with a ``TrainerCallback``: the wall time from one optimizer step's end to the next (CUDA synchronised;
the first step is timed from the start of training), the real tokens of the step (the attention masks of the
chosen and rejected sequences of its micro-batches: prompt twice, answers, no padding), and
``torch.cuda.max_memory_allocated`` over the whole process (as `tunesmith train`'s ``memory_gb``). The JSON holds
the fields of the bench's rows (`tunesmith.bench.rows.RowResult`: ``tokens_per_s`` is the median of the steps
after ``--warmup``, ``steps`` every step's tokens/s, ``peak_gib``) and ``details``.

TRL is imported only here, lazily; without it the script says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

LORA = {"r": 64, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": "all-linear"}
DPO_LOSS, DPO_BETA = "sigmoid", 0.1
LEARNING_RATE = 2e-4
TRL_HINT = ("pip install trl==1.16.0 (the GPU machine has no index: copy /work/shared/wheels/gpu/trl-1.16.0-py3-none-"
            "any.whl into .whl/, which bench/gpu_suite.sh installs)")


class TrlMissing(RuntimeError):
    pass


def import_trl():
    """The ``trl`` module, or TrlMissing with what to install."""
    try:
        import trl
    except ImportError as exc:
        raise TrlMissing(f"TRL is not importable ({exc}): the trl rows time TRL's DPOTrainer / ORPOTrainer as the "
                         f"baseline. {TRL_HINT}") from exc
    return trl


def trainer_classes(objective: str) -> tuple[Any, Any]:
    """(config class, trainer class) of ``objective``: DPO from ``trl``, ORPO from ``trl.experimental.orpo``
    (TRL 1.x moved it there) or, in older releases, ``trl``."""
    trl = import_trl()
    if objective == "dpo":
        return trl.DPOConfig, trl.DPOTrainer
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    except ImportError:
        if not hasattr(trl, "ORPOTrainer"):
            raise TrlMissing(f"TRL {trl.__version__} has no ORPOTrainer (neither trl.experimental.orpo nor trl): "
                             "only 'trl dpo' rows can run") from None
        ORPOConfig, ORPOTrainer = trl.ORPOConfig, trl.ORPOTrainer  # noqa: N806 - class names
    return ORPOConfig, ORPOTrainer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tunesmith.bench.trl_pref", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder (weights and tokenizer)")
    p.add_argument("--data", required=True, help='pairs JSONL: {"prompt", "chosen", "rejected"} text per line')
    p.add_argument("--objective", choices=["dpo", "orpo"], required=True)
    p.add_argument("--method", choices=["lora", "qlora", "full"], required=True)
    p.add_argument("--steps", type=int, default=10, help="optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the median")
    p.add_argument("--accumulate", type=int, default=4, help="micro-batches (of one pair) per optimizer step")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per sequence (chosen or rejected)")
    p.add_argument("--template", default="internlm_chat", help="prompt template the pairs are rendered with")
    p.add_argument("--work", default=None, help="TRL's output_dir (nothing is saved; default: beside --json)")
    p.add_argument("--row", default=None, help="the row's text in the JSON (default: 'trl OBJECTIVE METHOD')")
    p.add_argument("--json", required=True, dest="json_out", help="where the result goes")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.accumulate < 1 or args.max_length < 16:
        p.error("--steps and --accumulate must be >= 1, --warmup >= 0, --max-length >= 16")
    if not Path(args.data).is_file():
        p.error(f"--data {args.data}: no such file")
    args.row = args.row or f"trl {args.objective} {args.method}"
    return args


class StepMeter:
    """The TrainerCallback that times optimizer steps, fed the real tokens of each micro-batch by `count`."""

    def __init__(self, total_steps: int, sync, echo=print):
        self.total, self.sync, self.echo = total_steps, sync, echo
        self.pending: list[Any] = []
        self.seconds: list[float] = []
        self.tokens: list[int] = []
        self.last = time.perf_counter()

    def count(self, inputs: dict[str, Any]) -> None:
        """One micro-batch: its chosen + rejected attention masks, kept as (device) tensors until the step ends,
        so counting adds no synchronisation."""
        masks = [v for k, v in inputs.items() if k.endswith("attention_mask") and not k.startswith("prompt")]
        if masks:
            self.pending.append(sum(m.sum() for m in masks))

    def callback(self):
        from transformers import TrainerCallback

        meter = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                meter.sync()
                meter.last = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                meter.step_end()

        return _Callback()

    def step_end(self) -> None:
        self.sync()
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        tokens = sum(int(n) for n in self.pending)
        self.pending.clear()
        self.seconds.append(seconds)
        self.tokens.append(tokens)
        self.echo(f"trl step {len(self.seconds)}/{self.total}: {tokens / max(seconds, 1e-9):,.0f} tok/s "
                  f"({tokens} tokens in {seconds:.2f}s)", flush=True)

    def rates(self) -> list[float]:
        return [t / max(s, 1e-9) for t, s in zip(self.tokens, self.seconds, strict=True)]


def trl_dataset(tokenizer: Any, data: str, template: str):
    from datasets import Dataset

    from tunesmith.bench.pairs import pair_texts, read_pairs

    pairs = read_pairs(data)
    if not pairs:
        raise ValueError(f"{data}: no pairs")
    return Dataset.from_list([pair_texts(tokenizer, p, template) for p in pairs])


def sequence_check(dataset: Any, objective: str, max_length: int, eos_id: int | None) -> dict[str, Any]:
    """Tokens per pair of TRL's tokenized dataset, and how many sequences TRL would cut at ``max_length``."""
    lengths, longest, cut = [], 0, 0
    for row in dataset:
        if objective == "dpo":  # prompt and answers apart; the collator cuts prompt + answer at max_length
            seqs = [len(row["prompt_ids"]) + len(row[k]) for k in ("chosen_ids", "rejected_ids")]
            cut += sum(n > max_length for n in seqs)
        else:  # ORPO cut the answers already: a kept sequence ends with the EOS TRL appended
            seqs = [len(row[k]) for k in ("chosen_input_ids", "rejected_input_ids")]
            cut += sum(row[k][-1] != eos_id for k in ("chosen_input_ids", "rejected_input_ids"))
        lengths.append(sum(min(n, max_length) for n in seqs))
        longest = max(longest, *seqs)
    return {"pairs": len(lengths), "cut": cut, "tokens_per_pair": statistics.mean(lengths) if lengths else 0.0,
            "longest_sequence": longest}


def build_trainer(args: argparse.Namespace, meter: StepMeter, on_cuda: bool):
    import torch
    from transformers import AutoTokenizer

    config_cls, trainer_cls = trainer_classes(args.objective)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = trl_dataset(tokenizer, args.data, args.template)
    init: dict[str, Any] = {"dtype": torch.bfloat16 if on_cuda else torch.float32, "attn_implementation": "sdpa"}
    quantization = None
    if args.method == "qlora":
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    peft_config = None
    if args.method != "full":
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", **LORA)
    common = {"output_dir": args.work, "per_device_train_batch_size": 1,
              "gradient_accumulation_steps": args.accumulate, "max_steps": args.steps,
              "learning_rate": LEARNING_RATE, "bf16": on_cuda, "gradient_checkpointing": True,
              "max_length": args.max_length, "report_to": "none", "save_strategy": "no", "eval_strategy": "no",
              "model_init_kwargs": init}
    kwargs: dict[str, Any] = {"model": args.model, "train_dataset": dataset, "processing_class": tokenizer,
                              "peft_config": peft_config, "callbacks": [meter.callback()]}
    if args.objective == "dpo":
        config = config_cls(**common, loss_type=[DPO_LOSS], beta=DPO_BETA, precompute_ref_log_probs=False)
        kwargs["quantization_config"] = quantization
    else:
        if quantization is not None:  # ORPOTrainer has no quantization_config argument: it loads with these
            init["quantization_config"] = quantization
        config = config_cls(**common)
    trainer = trainer_cls(args=config, **kwargs)
    step = trainer.training_step

    def counted_step(*a: Any, **kw: Any):
        inputs = a[1] if len(a) > 1 else kw["inputs"]
        meter.count(inputs)
        return step(*a, **kw)

    trainer.training_step = counted_step
    return trainer, tokenizer


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("trl", "transformers", "peft", "torch", "accelerate", "datasets", "bitsandbytes"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


def peak_gib(on_cuda: bool) -> float:
    import torch

    if on_cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux, like `tunesmith train`


def run(args: argparse.Namespace, result: Any) -> None:
    import torch

    on_cuda = torch.cuda.is_available()
    if args.method == "qlora" and not on_cuda:
        raise RuntimeError("qlora needs a CUDA GPU (bitsandbytes NF4)")
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    if args.work is None:
        args.work = str(Path(args.json_out).with_suffix("")) + "-trainer"
    meter = StepMeter(args.steps, sync)
    trainer, tokenizer = build_trainer(args, meter, on_cuda)
    check = sequence_check(trainer.train_dataset, args.objective, args.max_length, tokenizer.eos_token_id)
    from tunesmith.bench.pairs import read_pairs

    dropped = len(read_pairs(args.data)) - check["pairs"]
    if dropped:
        raise ValueError(f"TRL dropped {dropped} pairs whose prompt fills max_length {args.max_length}")
    if check["cut"]:
        raise ValueError(f"TRL would cut {check['cut']} sequences at max_length {args.max_length}: the pairs file "
                         "does not fit (write it with tunesmith.bench.pairs)")
    trainer.train()
    rates = meter.rates()
    timed = rates[args.warmup:] or rates
    result.steps = rates
    result.tokens_per_s = statistics.median(timed) if timed else 0.0
    result.peak_gib = peak_gib(on_cuda)
    # the last record with the rewards (TRL logs every logging_steps, and its metrics again at the end)
    last = next((h for h in reversed(trainer.state.log_history) if any("rewards/" in k for k in h)), {})
    accuracy = next((v for k, v in last.items() if k.endswith("rewards/accuracies")), None)
    result.note = f"TRL {versions().get('trl', '?')}, {check['tokens_per_pair']:,.0f} tok/pair"
    if accuracy is not None:
        result.note += f", acc {accuracy:.2f}"
    result.details = {"objective": args.objective, "method": args.method, "versions": versions(),
                      "tokens_per_step": meter.tokens, "seconds_per_step": meter.seconds, "dataset": check,
                      "last_log": last, "device": torch.cuda.get_device_name(0) if on_cuda else "cpu",
                      "attn_implementation": getattr(trainer.model.config, "_attn_implementation", None)}


def write_result(path: str, result: Any) -> None:
    payload = {**asdict(result), "details": getattr(result, "details", {})}
    tmp = path + ".tmp"
    Path(tmp).write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    # before transformers / huggingface_hub are imported: they read these once (TRL's trainers ping the Hub)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from tunesmith.bench.rows import RowResult

    args = parse_args(argv)
    result = RowResult(args.row)
    result.details = {}
    start = time.perf_counter()
    try:
        import_trl()
        run(args, result)
    except TrlMissing as exc:
        result.error = str(exc)
        result.seconds = time.perf_counter() - start
        write_result(args.json_out, result)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BaseException as exc:
        result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        result.seconds = time.perf_counter() - start
        write_result(args.json_out, result)
        raise
    result.seconds = time.perf_counter() - start
    write_result(args.json_out, result)
    print(f"trl {args.objective} {args.method}: {result.tokens_per_s:,.0f} tok/s (median of steps "
          f"{args.warmup + 1}-{args.steps}), peak {result.peak_gib:.2f} GiB; {result.note}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
