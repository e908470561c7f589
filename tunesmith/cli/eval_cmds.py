"""`tunesmith eval MODEL --data FILE`: held-out loss, perplexity, ROUGE-L / BLEU (or, on preference pairs, ranking
accuracy, margin and DPO reward) and a report."""

from __future__ import annotations

from typing import Optional

import typer

EVAL_HELP = """\
Measure a model on held-out conversations: loss and perplexity of the reference answers (answer tokens only,
rendered with the training template), ROUGE-L and BLEU of generated answers, and a report
(OUT/report.md, OUT/report.json, OUT/report.png).

On held-out preference pairs (records with chosen / rejected; --format preference, ultrafeedback or hh_rlhf) it
ranks instead of generating: the share of pairs whose chosen answer has the higher mean log-probability per token
(preference accuracy) and the mean difference (margin), for each model; with --compare (the model before tuning),
DPO's implicit reward of MODEL relative to it (reward accuracy and margin, beta = 1).

\b
  tunesmith data split medqa.jsonl --train medqa-train.jsonl --test medqa-test.jsonl --ratio 0.7 --seed 0
  tunesmith eval ./merged --data medqa-test.jsonl --prompt-template internlm_chat
  tunesmith eval ./internlm-chat-7b --adapter ./hf --compare ./internlm-chat-7b --data medqa-test.jsonl
  tunesmith eval builtin:smollm2-135m-instruct --data examples/data/oasst1_guanaco_eval.jsonl \\
      --max-samples 50 --max-new-tokens 0        # loss and perplexity only
  tunesmith eval ./merged --data pairs-test.jsonl --compare builtin:smollm2-135m-instruct   # preference pairs
"""


def register(app: typer.Typer) -> None:
    @app.command("eval", help=EVAL_HELP)
    def eval_cmd(
        model: str = typer.Argument(..., help="Model folder, hub id, .gguf file or builtin:smollm2-135m-instruct."),
        data: str = typer.Option(
            ...,
            "--data",
            help="Held-out data file (conversation / openai / oasst1 / alpaca ..., or preference pairs with chosen / "
            "rejected).",
        ),
        adapter: Optional[str] = typer.Option(None, "--adapter", help="PEFT adapter folder for MODEL."),
        prompt_template: Optional[str] = typer.Option(
            None,
            "--prompt-template",
            help="Template used in training (tunesmith list-template) or 'auto'. Default: the adapter's training "
            "template with --adapter, else auto when the tokenizer has a chat template.",
        ),
        data_format: str = typer.Option("auto", "--format", help="Reader name (list-dataset-format), or auto."),
        system: Optional[str] = typer.Option(None, "--system", help="System prompt for conversations without one."),
        compare: Optional[str] = typer.Option(
            None, "--compare", help="A second model (e.g. the base) to put side by side."
        ),
        compare_adapter: Optional[str] = typer.Option(
            None, "--compare-adapter", help="Adapter for the --compare model."
        ),
        max_samples: Optional[int] = typer.Option(
            None, "--max-samples", min=1, help="Use the first N conversations (or pairs)."
        ),
        max_new_tokens: int = typer.Option(
            128,
            "--max-new-tokens",
            min=0,
            help="Answer length for ROUGE-L / BLEU; 0 = loss and perplexity only (pairs: not used).",
        ),
        max_length: int = typer.Option(
            2048,
            "--max-length",
            min=16,
            help="Longest conversation scored, in tokens (pairs: each answer with its prompt).",
        ),
        batch_size: int = typer.Option(
            8, "--batch-size", min=1, help="Answers generated together (pairs: pairs per forward)."
        ),
        out: str = typer.Option("eval_report", "--out", help="Folder for report.md / report.json / report.png."),
        bits: Optional[int] = typer.Option(None, "--bits", help="Load in 4-bit (NF4) or 8-bit (needs bitsandbytes)."),
        torch_dtype: str = typer.Option("auto", "--torch-dtype", help="auto, fp16, bf16 or fp32."),
        trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run the model folder's own code."),
        no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    ) -> None:
        from tunesmith.evaluate.run import EvalOptions, run_eval

        report = run_eval(
            EvalOptions(
                model=model,
                data=data,
                adapter=adapter,
                prompt_template=prompt_template,
                data_format=data_format,
                system=system or "",
                compare=compare,
                compare_adapter=compare_adapter,
                max_samples=max_samples,
                max_new_tokens=max_new_tokens,
                max_length=max_length,
                batch_size=batch_size,
                out=out,
                bits=bits,
                torch_dtype=torch_dtype,
                trust_remote_code=trust_remote_code,
                progress=not no_progress,
            )
        )
        typer.echo(f"report: {report['files']['md']} (+ report.json, report.png)")
