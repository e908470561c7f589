"""Data commands: `data convert`, `data split`, `check-custom-dataset`, `log-dataset`, `list-dataset-format`,
`list-template`. Thin: parse, call tunesmith.data, print."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from tunesmith.cli.overrides import OVERRIDES_CONTEXT, SET_HELP, overrides_from
from tunesmith.errors import TunesmithError

data_app = typer.Typer(name="data", help="Prepare training data: convert tables to conversations, split them.",
                       no_args_is_help=True, rich_markup_mode=None)


@data_app.command("convert")
def data_convert(
    src: Path = typer.Argument(..., help="Input: .xlsx / .xls / .csv / .tsv / .json / .jsonl / .parquet."),
    dst: Path = typer.Argument(..., help="Output conversation JSONL file."),
    input_col: str = typer.Option(None, "--input-col", help="Column holding the question / instruction."),
    output_col: str = typer.Option(None, "--output-col", help="Column holding the answer."),
    system: str = typer.Option("", "--system", help="System prompt text for every record."),
    system_template: str = typer.Option(None, "--system-template",
                                        help="Named system prompt (see list-template), e.g. medical_professor."),
    sheet: str = typer.Option(None, "--sheet", help="Spreadsheet sheet name or 0-based index (default: first)."),
) -> None:
    """Turn a table of questions and answers into conversation JSONL (rows with an empty cell are dropped).

    Example: tunesmith data convert MedInfo2019-QA-Medications.xlsx medqa.jsonl --input-col Question
    --output-col Answer --system-template medical_professor
    """
    from tunesmith.data.convert import convert_table

    sheet_arg: str | int | None = int(sheet) if sheet is not None and sheet.isdigit() else sheet
    result = convert_table(src, dst, input_col=input_col, output_col=output_col, system=system,
                           system_template=system_template, sheet=sheet_arg)
    typer.echo(f"{result.rows} rows read ({result.input_col!r} -> {result.output_col!r}), {result.written} records "
               f"written to {dst}, {len(result.dropped)} dropped")
    for line in result.dropped[:20]:
        typer.echo(f"  dropped {line}")
    if len(result.dropped) > 20:
        typer.echo(f"  ... and {len(result.dropped) - 20} more")


@data_app.command("split")
def data_split(
    src: Path = typer.Argument(..., help="Input .jsonl / .json file of records."),
    train: Path = typer.Option(None, "--train", help="Training part (default: <IN>-train.jsonl)."),
    test: Path = typer.Option(None, "--test", help="Held-out part (default: <IN>-test.jsonl)."),
    ratio: float = typer.Option(0.7, "--ratio", help="Share of records in the training part."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same split)."),
) -> None:
    """Split records randomly and reproducibly into a training and a test file.

    Example: tunesmith data split medqa.jsonl --train medqa-train.jsonl --test medqa-test.jsonl --ratio 0.7
    """
    from tunesmith.data.convert import default_split_paths, split_records

    n_train, n_test = split_records(src, train, test, ratio=ratio, seed=seed)
    d_train, d_test = default_split_paths(src)
    typer.echo(f"{n_train} records -> {train or d_train}, {n_test} records -> {test or d_test}")


def _load_cfg(config: str, overrides: list[str] | None) -> Any:
    from tunesmith.config import load_config
    from tunesmith.data.dataset import validate_data_names

    cfg, _ = load_config(config, overrides or [])
    validate_data_names(cfg)  # unknown names fail before a tokenizer is loaded
    return cfg


def _tokenizer(cfg: Any) -> Any:
    from tunesmith.models import load_tokenizer

    return load_tokenizer(cfg.model.tokenizer_path or cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)


def check_custom_dataset(
    ctx: typer.Context,
    config: str = typer.Argument(..., help="Config file or built-in recipe name."),
    overrides: list[str] = typer.Option(None, "--set", "--cfg-options", help=SET_HELP),
    no_tokenizer: bool = typer.Option(False, "--no-tokenizer", help="Only validate records (skip token lengths)."),
) -> None:
    """Validate every record of a config's dataset: problems with file and line, turns, token lengths (for
    preference pairs: pairs left, lengths of the chosen and of the rejected sequences, answers cut).

    Example: tunesmith check-custom-dataset ./internlm_chat_7b_qlora_medqa2019_e3_copy.yaml
    """
    from tunesmith.data.check import check_dataset

    cfg = _load_cfg(config, overrides_from(ctx, overrides))
    tokenizer = None if no_tokenizer else _tokenizer(cfg)
    report = check_dataset(cfg, tokenizer)
    typer.echo(report.format())
    if not report.ok:
        raise typer.Exit(2)


def log_dataset(
    ctx: typer.Context,
    config: str = typer.Argument(..., help="Config file or built-in recipe name."),
    show: str = typer.Option("all", "--show", help="text | masked_text | input_ids | labels | all"),
    n: int = typer.Option(2, "-n", "--num", help="How many samples (rows) to show; rows of preference pairs are "
                          "shown sequence by sequence, as 'pair K chosen' / 'pair K rejected'."),
    overrides: list[str] = typer.Option(None, "--set", "--cfg-options", help=SET_HELP),
) -> None:
    """Show the first training samples after templating and packing (what the model will see); preference pairs
    sequence by sequence.

    Example: tunesmith log-dataset internlm_chat_7b_qlora_oasst1_e3 --show masked_text
    """
    from tunesmith.data.check import SHOW_CHOICES, show_samples

    if show not in SHOW_CHOICES:
        raise TunesmithError(f"unknown --show {show!r}", f"use one of {', '.join(SHOW_CHOICES)}")
    cfg = _load_cfg(config, overrides_from(ctx, overrides))
    typer.echo(show_samples(cfg, _tokenizer(cfg), show=show, n=n))


def list_dataset_format() -> None:
    """List the dataset formats (data.format).

    Example: tunesmith list-dataset-format
    """
    from tunesmith.data.readers import FORMATS

    width = max(map(len, FORMATS))
    for name, fmt in FORMATS.items():
        typer.echo(f"{name:<{width}}  {fmt.description}")


def list_template() -> None:
    """List the prompt templates (data.prompt_template) and the system templates (data.system_template).

    Example: tunesmith list-template
    """
    from tunesmith.data.templates import SYSTEM_TEMPLATES, TEMPLATES

    typer.echo("PROMPT_TEMPLATE:")
    typer.echo("  auto  (the tokenizer's own chat template)")
    for name, t in TEMPLATES.items():
        typer.echo(f"  {name}  {t.instruction!r}")
    typer.echo("SYSTEM_TEMPLATE:")
    for name, text in SYSTEM_TEMPLATES.items():
        first = text.strip().splitlines()[0]
        typer.echo(f"  {name}  {first[:70]}{'...' if len(first) > 70 or len(text.strip().splitlines()) > 1 else ''}")


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
    app.command("check-custom-dataset", context_settings=OVERRIDES_CONTEXT)(check_custom_dataset)
    app.command("log-dataset", context_settings=OVERRIDES_CONTEXT)(log_dataset)
    app.command("list-dataset-format")(list_dataset_format)
    app.command("list-template")(list_template)
