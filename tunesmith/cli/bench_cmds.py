"""`bench`: throughput and memory of a training step, tunesmith against a plain transformers + peft loop."""

from __future__ import annotations

import typer

from tunesmith.errors import TunesmithError


def bench(
    model_shape: str = typer.Option("tiny", "--model-shape", help="internlm-7b, 1.8b or tiny (random weights)."),
    method: str = typer.Option("lora", "--method", help="lora, qlora or full."),
    seq_len: int = typer.Option(2048, "--seq-len", help="Tokens per row (batch 1)."),
    steps: int = typer.Option(5, "--steps", help="Timed steps per variant (median reported)."),
    warmup: int = typer.Option(2, "--warmup", help="Untimed steps before timing."),
    variants: str = typer.Option(None, "--variants", help="Comma-separated variant names to run (default: all)."),
    profile: bool = typer.Option(False, "--profile", help="Print a torch.profiler top-kernel summary."),
    longest: bool = typer.Option(False, "--longest", help="Search the longest trainable sequence instead."),
    card_gib: float = typer.Option(80.0, "--card-gib", help="--longest: memory of the card to emulate."),
    longest_max: int = typer.Option(65536, "--longest-max", help="--longest: stop searching at this length."),
    time_budget: float = typer.Option(480.0, "--time-budget", help="Seconds; later variants are skipped past it."),
    device: str = typer.Option("auto", "--device", help="auto, cuda or cpu."),
    json_out: str = typer.Option(None, "--json", help="Also write the results to this JSON file."),
) -> None:
    """Time training steps of a random-initialised model: a plain transformers + peft loop (baseline) against
    tunesmith's fast paths, each switched off in turn. Prints tokens/s, peak GiB, ratio to baseline and MFU.

    Example: tunesmith bench --model-shape internlm-7b --method qlora --seq-len 2048 --steps 5
    """
    from tunesmith.bench import BenchOptions, run_bench

    if steps < 1 or warmup < 0 or seq_len < 16:
        raise TunesmithError("--steps must be >= 1, --warmup >= 0 and --seq-len >= 16", "e.g. --steps 5 --seq-len 2048")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise TunesmithError("--device cuda but no CUDA GPU is visible", "use --device cpu with --model-shape tiny")
    run_bench(
        BenchOptions(
            model_shape=model_shape,
            method=method.lower(),
            seq_len=seq_len,
            steps=steps,
            warmup=warmup,
            variants=[v.strip() for v in variants.split(",") if v.strip()] if variants else None,
            profile=profile,
            longest=longest,
            longest_card_gib=card_gib,
            longest_max=longest_max,
            time_budget_s=time_budget,
            device=device,
            json_out=json_out,
        )
    )


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
