"""The `bench` command: the product's training step against a plain loop in one process, or (``--end-to-end``)
`tunesmith train` itself against a plain loop on a random-weight model folder."""

from __future__ import annotations

import typer

from tunesmith.errors import TunesmithError

BENCH_HELP = """Time training on a random-weight model: tunesmith against a plain transformers + peft loop.

Step mode (default) builds both in one process and times single steps, each fast path switched off in turn.
--end-to-end writes a model folder of the shape and runs `tunesmith train` itself (as a user does) beside the
plain loop on the same folder and data; the train rows' numbers come from the run's own metrics.jsonl. Preference
rows ('trl dpo|orpo METHOD': TRL's trainer, TRL must be installed; 'train METHOD dpo|orpo [@trl]') run on a pairs
file cut from --data, each sequence (chosen or rejected) up to --pair-length tokens.

\b
Examples:
  tunesmith bench --model-shape internlm-7b --method qlora --steps 8 --profile
  tunesmith bench --end-to-end --model-shape internlm-7b --rows 'plain lora; train lora; train lora @plain'
  tunesmith bench --end-to-end --model-shape internlm-7b --rows 'trl dpo lora; train lora dpo; train lora dpo @trl'
"""


def bench(
    model_shape: str = typer.Option("tiny", "--model-shape", help="internlm-7b, 1.8b or tiny (random weights)."),
    method: str = typer.Option("lora", "--method", help="lora, qlora or full (step mode)."),
    seq_len: int = typer.Option(2048, "--seq-len", help="Tokens per row (batch 1)."),
    steps: int = typer.Option(8, "--steps", help="Timed steps per variant (end-to-end: steps per train row)."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed steps before timing (end-to-end: steps not counted)."),
    variants: str = typer.Option(None, "--variants", help="Comma-separated variant names to run (default: all)."),
    overrides: list[str] = typer.Option(None, "--set", help="Config overrides for every tunesmith variant."),
    profile: bool = typer.Option(False, "--profile", help="Print a torch.profiler top-kernel summary."),
    longest: bool = typer.Option(False, "--longest", help="Search the longest trainable sequence instead."),
    card_gib: float = typer.Option(80.0, "--card-gib", help="--longest: memory of the card to emulate."),
    longest_max: int = typer.Option(65536, "--longest-max", help="--longest: stop searching at this length."),
    qlora_budget_gib: float = typer.Option(8.0, "--qlora-budget-gib", help="QLoRA: memory the plan fits into."),
    end_to_end: bool = typer.Option(False, "--end-to-end", help="Run `tunesmith train` itself (see above)."),
    rows: str = typer.Option(None, "--rows", help="--end-to-end: ';'-separated rows, e.g. 'plain lora; train lora "
                                                  "@plain; train qlora @8 training.optimizer=adamw_8bit' or 'trl dpo "
                                                  "lora; train lora dpo @trl'."),
    data: str = typer.Option(None, "--data", help="--end-to-end: oasst1 data file (default: the bundled sample)."),
    tokenizer: str = typer.Option("builtin:smollm2-135m-instruct", "--tokenizer",
                                  help="--end-to-end: tokenizer of the model folder."),
    work: str = typer.Option("bench_e2e", "--work", help="--end-to-end: folder for the model and the runs."),
    accumulate: int = typer.Option(4, "--accumulate", help="--end-to-end: micro-batches per step."),
    pair_length: int = typer.Option(1024, "--pair-length",
                                    help="--end-to-end, dpo / orpo rows: tokens per sequence (chosen or rejected)."),
    time_budget: float = typer.Option(480.0, "--time-budget", help="Seconds; later variants are skipped past it."),
    device: str = typer.Option("auto", "--device", help="auto, cuda or cpu."),
    json_out: str = typer.Option(None, "--json", help="Also write the results to this JSON file."),
) -> None:
    if steps < 1 or warmup < 0 or seq_len < 16:
        raise TunesmithError("--steps must be >= 1, --warmup >= 0 and --seq-len >= 16", "e.g. --steps 5 --seq-len 2048")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise TunesmithError("--device cuda but no CUDA GPU is visible", "use --device cpu with --model-shape tiny")
    if end_to_end:
        from tunesmith.bench.e2e import DEFAULT_ROWS, E2EOptions, run_end_to_end

        options = E2EOptions(model_shape=model_shape, rows=rows or DEFAULT_ROWS, steps=steps, warmup=warmup,
                             accumulate=accumulate, seq_len=seq_len, tokenizer=tokenizer, work=work,
                             time_budget_s=time_budget, json_out=json_out, pair_length=pair_length)
        if data:
            options.data = data
        run_end_to_end(options)
        return
    from tunesmith.bench import BenchOptions, run_bench

    run_bench(BenchOptions(
        model_shape=model_shape, method=method.lower(), seq_len=seq_len, steps=steps, warmup=warmup,
        variants=[v.strip() for v in variants.split(",") if v.strip()] if variants else None, profile=profile,
        longest=longest, longest_card_gib=card_gib, longest_max=longest_max, time_budget_s=time_budget,
        device=device, json_out=json_out, qlora_budget_gib=qlora_budget_gib, overrides=list(overrides or [])))
