"""`tunesmith train CONFIG`: parse, call tunesmith.train.train, print. Multi-GPU through torchrun's
variables (NPROC_PER_NODE, NNODES, NODE_RANK, ADDR, PORT), as XTuner."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import typer
from typer.core import TyperCommand

from tunesmith.cli.overrides import OVERRIDES_CONTEXT, overrides_from

TRAIN_HELP = """Fine-tune a model with a config (a YAML file or a built-in recipe name).

Checkpoints go to WORK_DIR/epoch_N.pth (and iter_N.pth with training.save_steps), with metrics.jsonl,
TensorBoard events, loss.png and the evaluation answers (eval_outputs/). Ctrl-C saves and prints the
command that resumes.

Everything printed also goes to WORK_DIR/train.log (appended to on --resume). On a terminal a live bar shows
the steps; without one (as under nohup) progress is plain lines, one per training.log_interval steps, with
loss, lr, tokens/s, memory, elapsed time and ETA, each written at once for tail -f.

\b
Examples:
  tunesmith train ./internlm_chat_7b_qlora_oasst1_e3_copy.yaml
  tunesmith train my.yaml --deepspeed deepspeed_zero2 --set training.lr=1e-4 data.max_length=1024
  tunesmith train my.yaml --resume auto          # continue exactly where the last checkpoint stopped
  NPROC_PER_NODE=8 tunesmith train my.yaml --deepspeed deepspeed_zero2     # all GPUs of a host
  nohup tunesmith train my.yaml > train.out 2>&1 &      # in the background; follow it: tail -f train.out
"""


class _TrainCommand(TyperCommand):
    """`--resume` with no value means `--resume auto` (XTuner-style optional value)."""

    def parse_args(self, ctx, args):
        args = list(args)
        for i, a in enumerate(args):
            if a == "--resume" and (i + 1 == len(args) or args[i + 1].startswith("-")):
                args.insert(i + 1, "auto")
                break
        return super().parse_args(ctx, args)


def _train_args() -> list[str]:
    argv = sys.argv[1:]
    return argv[argv.index("train") + 1:] if "train" in argv else []


def register(app: typer.Typer) -> None:
    @app.command("train", help=TRAIN_HELP, cls=_TrainCommand, context_settings=OVERRIDES_CONTEXT)
    def train_cmd(
        ctx: typer.Context,
        config: str = typer.Argument(..., help="Config YAML path or built-in recipe name (see list-cfg)."),
        work_dir: Path = typer.Option(
            None, "--work-dir", help="Output folder (default: config's work_dir, else ./work_dirs/<config name>)."
        ),
        deepspeed: str = typer.Option(
            None, "--deepspeed", help="deepspeed_zero1|zero2|zero2_offload|zero3|zero3_offload or a JSON file."
        ),
        resume: str = typer.Option(
            None,
            "--resume",
            help="Resume: 'auto' (the work dir's last checkpoint; also plain --resume) or a checkpoint folder.",
        ),
        seed: int = typer.Option(None, "--seed", help="Random seed (overrides training.seed)."),
        overrides: list[str] = typer.Option(
            None,
            "--set",
            "--cfg-options",
            help="Config overrides key=value ... e.g. --set training.lr=1e-4 data.max_length=1024",
        ),
        no_progress: bool = typer.Option(False, "--no-progress",
                                         help="Plain log lines instead of a progress bar, also on a terminal."),
    ) -> None:
        from tunesmith.train.launch import relaunch

        sets = overrides_from(ctx, overrides)
        code = relaunch(_train_args())
        if code is not None:
            raise typer.Exit(code)

        from tunesmith.config import load_config
        from tunesmith.train import train

        flags = [f"distributed.deepspeed={deepspeed}"] if deepspeed is not None else []
        flags += [f"training.seed={seed}"] if seed is not None else []
        flags += [f"work_dir={work_dir}"] if work_dir is not None else []
        cfg, stem = load_config(config, sets + flags)
        result = train(cfg, resume=resume, config_name=stem, progress=not no_progress)  # it prints the summary
        is_main = os.environ.get("RANK", "0") == "0"
        if result.interrupted:
            if is_main:
                typer.echo(f"resume with:\n  {resume_command(result.work_dir)}")
            raise typer.Exit(130)


def resume_command(work_dir: Path) -> str:
    """The command line that continues this run: this process's own `tunesmith train ...` arguments (without an
    earlier --resume) plus --work-dir and --resume auto."""
    args = _train_args()
    kept, i = [], 0
    while i < len(args):
        a = args[i]
        if a == "--resume":
            i += 2 if i + 1 < len(args) and not args[i + 1].startswith("-") else 1
            continue
        if not a.startswith("--resume="):
            kept.append(a)
        i += 1
    if "--work-dir" not in kept and not any(a.startswith("--work-dir=") for a in kept):
        kept += ["--work-dir", str(work_dir)]
    return "tunesmith train " + " ".join(shlex.quote(a) for a in kept) + " --resume auto"
