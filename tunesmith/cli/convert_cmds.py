"""`convert pth_to_hf`, `convert merge`, `convert split`, `convert gguf`: parse, call tunesmith.export, print.
`convert xtuner-config`: parse, call tunesmith.config.xtuner, print."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tunesmith.cli.overrides import OVERRIDES_CONTEXT, overrides_from
from tunesmith.progress import callback_bar

convert_app = typer.Typer(
    name="convert",
    help="Turn checkpoints into Hugging Face folders: pth_to_hf, merge (adapter into base), split; gguf writes a "
    "model (+ adapter) for llama.cpp / Ollama; xtuner-config turns an XTuner .py config into a tunesmith YAML config.",
    no_args_is_help=True,
    rich_markup_mode=None,
)

PTH_TO_HF_HELP = """Convert a training checkpoint (work_dir/epoch_N.pth) into a Hugging Face folder.

LoRA / QLoRA checkpoints become a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) that
peft.PeftModel.from_pretrained loads, with the base model's tokenizer carrying the training prompt template as
its chat_template; no model weights are loaded for this (QLoRA never quantizes the base again). Full
fine-tuning checkpoints become a complete model folder (the base's config, weights sharded by
--max-shard-size). The config is copied beside it as tunesmith_config.yaml; a config other than the one that
trained the checkpoint is refused. Checkpoints trained under DeepSpeed ZeRO are read the same way.

Weights are saved as fp16 unless --fp32. Tensors already in bf16 stay bf16: fp16's smaller range could
overflow values bf16 holds, and bf16 is already half the size of fp32.

\b
Example:
  tunesmith convert pth_to_hf ./internlm_chat_7b_qlora_oasst1_e3_copy.yaml \\
      ./work_dirs/internlm_chat_7b_qlora_oasst1_e3_copy/epoch_3.pth ./hf
"""

MERGE_HELP = """Merge a LoRA / QLoRA adapter into its base model and save a complete model.

Streams shard by shard: each base tensor is read, gets scale * B @ A added (in fp32; on the GPU with
--device cuda / auto when there is one), and is written to the output shard at once, so memory stays at about
the adapter plus one tensor instead of the whole model. Trained biases and modules_to_save are applied too.
The base must be the full-precision model (for a QLoRA adapter: the original, not a 4-bit copy). InternLM
v1 / v2 bases are written back in their own layout. The output gets the index, config, generation config and
the tokenizer with the adapter's chat template (when the adapter folder has one, as pth_to_hf writes).
The base's own code is never run, so --trust-remote-code is accepted for XTuner compatibility only.

\b
Example:
  tunesmith convert merge ./internlm-chat-7b ./hf ./merged --max-shard-size 2GB
"""

SPLIT_HELP = """Rewrite a model folder with one shard per tensor (safetensors or .bin, no GPU needed).

Other files (config, tokenizer, ...) are copied and the index is written.

\b
Example:
  tunesmith convert split ./merged ./merged-split
"""


@convert_app.command("pth_to_hf", help=PTH_TO_HF_HELP, context_settings=OVERRIDES_CONTEXT)
def pth_to_hf_cmd(
    ctx: typer.Context,
    config: str = typer.Argument(..., help="The config the checkpoint was trained with (YAML path or recipe name)."),
    pth: Path = typer.Argument(..., help="Checkpoint folder: work_dir/epoch_N.pth or iter_N.pth."),
    save_dir: Path = typer.Argument(..., help="Output folder."),
    fp32: bool = typer.Option(False, "--fp32", help="Keep fp32 weights (default: fp16; bf16 stays bf16)."),
    max_shard_size: str = typer.Option("2GB", "--max-shard-size", help="Largest weight file (full fine-tuning)."),
    safe_serialization: bool = typer.Option(True, "--safe-serialization/--no-safe-serialization",
                                            help="Write safetensors (default) or pickled .bin files."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace SAVE_DIR if it exists."),
    overrides: list[str] = typer.Option(None, "--set", "--cfg-options",
                                        help="Config overrides key=value, as given to train."),
) -> None:
    from tunesmith.export.pth_to_hf import pth_to_hf

    overrides = overrides_from(ctx, overrides)
    with callback_bar("writing", unit="bytes", stderr=True) as progress:
        result = pth_to_hf(config, pth, save_dir, fp32=fp32, max_shard_size=max_shard_size,
                           safe_serialization=safe_serialization, overwrite=overwrite, overrides=overrides or [],
                           progress=progress)
    what = "PEFT adapter" if result.kind == "adapter" else "model"
    typer.echo(f"wrote {what} ({result.dtype}) to {result.save_dir}")
    if result.kind == "adapter":
        typer.echo(f"next: tunesmith convert merge {result.base_model} {result.save_dir} ./merged   "
                   f"or   tunesmith chat {result.base_model} --adapter {result.save_dir}")


@convert_app.command("merge", help=MERGE_HELP)
def merge_cmd(
    base: str = typer.Argument(..., help="Base model folder (full precision), or builtin:smollm2-135m-instruct."),
    adapter: Path = typer.Argument(..., help="Adapter folder (from convert pth_to_hf)."),
    save_dir: Path = typer.Argument(..., help="Output folder."),
    max_shard_size: str = typer.Option("2GB", "--max-shard-size", help="Largest weight file, e.g. 2GB, 500MB."),
    device: str = typer.Option("auto", "--device", help="Where the matmuls run: cpu, cuda or auto."),
    dtype: str = typer.Option("auto", "--dtype",
                              help="Output weights: auto (the base's dtype), fp16, bf16 or fp32."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                           help="Accepted for XTuner compatibility (no model code is run)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace SAVE_DIR if it exists."),
) -> None:
    from tunesmith.export.merge import merge_adapter
    from tunesmith.export.shards import format_size

    with callback_bar("merging", unit="bytes", stderr=True) as progress:
        result = merge_adapter(base, adapter, save_dir, max_shard_size=max_shard_size, device=device, dtype=dtype,
                               overwrite=overwrite, progress=progress)
    typer.echo(f"merged {result.lora_modules} LoRA modules ({result.replaced_tensors} tensors replaced) on "
               f"{result.device} into {result.save_dir}: {len(result.shards)} shard(s), "
               f"{format_size(result.total_bytes)}, {result.seconds:.1f} s")


@convert_app.command("split", help=SPLIT_HELP)
def split_cmd(
    src: Path = typer.Argument(..., help="Model folder to split."),
    dst: Path = typer.Argument(..., help="Output folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace DST if it exists."),
) -> None:
    from tunesmith.export.shards import format_size
    from tunesmith.export.split import split_checkpoint

    with callback_bar("splitting", unit="bytes", stderr=True) as progress:
        result = split_checkpoint(src, dst, overwrite=overwrite, progress=progress)
    kind = "safetensors" if result.safe else ".bin"
    typer.echo(f"wrote {result.shards} {kind} shards ({format_size(result.total_bytes)}) to {result.save_dir}")


GGUF_HELP = """Write a model, with a LoRA adapter merged in when given, as one GGUF file (llama.cpp, Ollama, LM Studio).

Streams tensor by tensor: nothing is built and memory stays at about one tensor (the adapter is merged into
each weight as it is read, as convert merge does). Writes Llama-family models (Llama, SmolLM2, Mistral without
a sliding window), InternLM2 (its fused wqkv split) and InternLM v1 without biases, all as llama.cpp's llama
architecture; others are refused. The tokenizer (the adapter's, which carries the training chat template, when
the adapter folder has one) goes in with its chat template.

\b
--type: f16 (default), bf16, f32, q8_0 or q4_0. Norms stay f32; token_embd and output take the type, except
q4_0, which keeps the output projection at q8_0 (as llama-quantize keeps it at higher precision). K-quants
(q4_k_m ...): write f16, then run llama.cpp's llama-quantize OUT.gguf OUT-Q4_K_M.gguf Q4_K_M.

--ollama also writes a Modelfile beside OUT (FROM, TEMPLATE rendering the training prompt, SYSTEM, stop
words): --prompt-template when given, else the adapter's recorded training template, else the named template
matching the tokenizer's own chat template.

\b
Example:
  tunesmith convert gguf builtin:smollm2-135m-instruct ./smollm2-ft.gguf --adapter ./hf --type q8_0 --ollama
  ollama create smollm2-ft -f Modelfile
"""


@convert_app.command("gguf", help=GGUF_HELP)
def gguf_cmd(
    model: str = typer.Argument(..., help="Base model: folder, hub id or builtin:smollm2-135m-instruct."),
    out: Path = typer.Argument(..., help="The GGUF file to write (*.gguf)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="LoRA adapter folder (from convert pth_to_hf) "
                                                                   "to merge in."),
    out_type: str = typer.Option("f16", "--type", help="f16, bf16, f32, q8_0 or q4_0."),
    ollama: bool = typer.Option(False, "--ollama", help="Also write an Ollama Modelfile beside OUT."),
    prompt_template: Optional[str] = typer.Option(
        None, "--prompt-template",
        help="The Modelfile's template (tunesmith list-template). Default: the adapter's training template, else "
             "the named template matching the tokenizer's chat template."),
    device: str = typer.Option("auto", "--device", help="Where the adapter merge runs: cpu, cuda or auto."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT (and the Modelfile) if they exist."),
) -> None:
    from tunesmith.export.shards import format_size
    from tunesmith.export.to_gguf import export_gguf

    with callback_bar("writing", unit="bytes", stderr=True) as progress:
        result = export_gguf(model, out, adapter=adapter, out_type=out_type, ollama=ollama,
                             prompt_template=prompt_template, device=device, overwrite=overwrite, progress=progress)
    typer.echo(f"wrote {result.path} ({result.out_type}, {result.tensors} tensors, {format_size(result.total_bytes)}, "
               f"vocabulary {result.vocab}) in {result.seconds:.1f} s")
    for note in result.notes:
        typer.echo(f"note: {note}")
    if result.modelfile is not None:
        typer.echo(f"wrote {result.modelfile} (template {result.template})")
        typer.echo(f"next: ollama create {result.path.stem} -f {result.modelfile}")


XTUNER_CONFIG_HELP = """Turn an XTuner 0.x Python config into a complete tunesmith YAML config.

The file is parsed, never run: nothing it imports or calls is executed. Read are the settings of its PART 1
(pretrained_model_name_or_path, data_path, prompt_template, max_length, pack_to_max_length, batch_size,
accumulative_counts, lr, betas, weight_decay, max_norm, max_epochs, warmup_ratio, evaluation_freq,
evaluation_inputs, SYSTEM, save_steps, save_total_limit), arithmetic and names between them included, and from
the structures below it: the method (qlora with a 4/8-bit BitsAndBytesConfig, lora with a LoraConfig, else full),
the LoRA r / alpha / dropout, the data format (dataset_map_fn=oasst1_map_fn -> oasst1), the optimizer and the
warm-up. What the file does not say, or says in a way that needs running it, comes from the closest built-in
recipe; each such setting is listed as a note, on screen and at the top of OUT.

\b
Example:
  tunesmith convert xtuner-config ./internlm_chat_7b_qlora_oasst1_e3_copy.py ./internlm_chat_7b_qlora_oasst1_e3.yaml
  tunesmith train ./internlm_chat_7b_qlora_oasst1_e3.yaml
"""


@convert_app.command("xtuner-config", help=XTUNER_CONFIG_HELP)
def xtuner_config_cmd(
    src: Path = typer.Argument(..., help="The XTuner config (.py), e.g. one written by `xtuner copy-cfg`."),
    out: Path = typer.Argument(..., help="The tunesmith config to write (.yaml)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
) -> None:
    from tunesmith.config.xtuner import convert_xtuner_file
    from tunesmith.data.readers import format_names
    from tunesmith.data.templates import system_template_names, template_names

    result = convert_xtuner_file(src, out, overwrite=overwrite, formats=format_names(), templates=template_names(),
                                 system_templates=system_template_names())
    typer.echo(f"read from {src} (the rest from the built-in recipe {result.recipe}):")
    width = max((len(r.key) for r in result.read), default=0)
    for reading in result.read:
        typer.echo(f"  {reading.key:<{width}}  {reading.shown}   <- {reading.origin}")
    if result.notes:
        typer.echo("notes:")
        for note in result.notes:
            typer.echo(f"  - {note}")
    typer.echo(f"wrote {out}")
    typer.echo(f"next: tunesmith train {out}")


def register(app: typer.Typer) -> None:
    app.add_typer(convert_app, name="convert")
