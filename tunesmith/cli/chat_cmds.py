"""`tunesmith chat MODEL`: XTuner's chat flags; the work is in tunesmith.infer.chat_app."""

from __future__ import annotations

from typing import Optional

import typer

CHAT_HELP = """\
Chat with a model in the terminal (streams the answer; history kept as token ids).

Type a message and end it with an empty line. EXIT leaves, RESET clears the history. Works with piped input.

\b
  tunesmith chat builtin:smollm2-135m-instruct --prompt-template auto
  tunesmith chat ./internlm-chat-7b --adapter ./hf --prompt-template internlm_chat --bits 4
  tunesmith chat ./moss --prompt-template moss_sft --system-template moss_sft --with-plugins calculate solve
  SERPER_API_KEY=... tunesmith chat ./internlm-chat-7b --adapter ./msagent-adapter --lagent
"""

PLUGIN_NAMES = ("calculate", "solve", "search")


def _split(values: list[str] | None) -> list[str]:
    out: list[str] = []
    for value in values or []:
        out += [v for v in value.split(",") if v]
    return out


def register(app: typer.Typer) -> None:
    @app.command(
        "chat",
        help=CHAT_HELP,
        context_settings={"allow_extra_args": True, "ignore_unknown_options": False},
    )
    def chat(
        ctx: typer.Context,
        model: str = typer.Argument(..., help="Model folder, hub id, .gguf file or builtin:smollm2-135m-instruct."),
        adapter: Optional[str] = typer.Option(None, "--adapter", help="PEFT adapter folder (from convert pth_to_hf)."),
        prompt_template: Optional[str] = typer.Option(
            None,
            "--prompt-template",
            help="Template name (tunesmith list-template) or 'auto' (the tokenizer's own). Default: with --adapter "
            "the template (and system prompt) it was trained with; else auto when the tokenizer has a chat "
            "template, else raw text.",
        ),
        system: Optional[str] = typer.Option(None, "--system", help="System prompt text."),
        system_template: Optional[str] = typer.Option(
            None, "--system-template", help="Named system prompt (e.g. moss_sft, alpaca)."
        ),
        bits: Optional[int] = typer.Option(None, "--bits", help="Load in 4-bit (NF4) or 8-bit (needs bitsandbytes)."),
        bot_name: str = typer.Option("BOT", "--bot-name", help="Fills {bot_name} in templates (MOSS)."),
        with_plugins: Optional[list[str]] = typer.Option(
            None, "--with-plugins", help="MOSS plugins: any of calculate solve search (needs the moss_sft templates)."
        ),
        no_streamer: bool = typer.Option(False, "--no-streamer", help="Print the whole answer at the end."),
        lagent: bool = typer.Option(
            False, "--lagent", help="ReAct agent with tools (web search needs SERPER_API_KEY)."
        ),
        allow_python: bool = typer.Option(
            False, "--allow-python", help="Give the agent a Python tool (separate process, time and memory limits)."
        ),
        max_steps: int = typer.Option(6, "--max-steps", help="Agent: tool calls per question at most."),
        command_stop_word: Optional[str] = typer.Option(
            None,
            "--command-stop-word",
            help="Stop word after a plugin command (XTuner 0.1.9; default <eoc> with plugins).",
        ),
        answer_stop_word: Optional[str] = typer.Option(
            None, "--answer-stop-word", help="Stop word after an answer (XTuner 0.1.9; default <eom> with plugins)."
        ),
        stop_words: Optional[list[str]] = typer.Option(
            None, "--stop-words", help="Extra stop words, added to the template's."
        ),
        offload_folder: Optional[str] = typer.Option(
            None, "--offload-folder", help="Folder for weights that do not fit the GPU."
        ),
        max_new_tokens: int = typer.Option(2048, "--max-new-tokens", help="Longest answer, in tokens."),
        temperature: float = typer.Option(0.1, "--temperature", help="0 = greedy (deterministic)."),
        top_k: int = typer.Option(40, "--top-k"),
        top_p: float = typer.Option(0.75, "--top-p"),
        repetition_penalty: float = typer.Option(1.0, "--repetition-penalty"),
        seed: int = typer.Option(0, "--seed", help="Random seed (sampling is reproducible)."),
        torch_dtype: str = typer.Option("auto", "--torch-dtype", help="auto, fp16, bf16 or fp32."),
        trust_remote_code: bool = typer.Option(
            False, "--trust-remote-code", help="Run the model folder's own Python code."
        ),
        decode_mode: str = typer.Option(
            "auto", "--decode-mode", help="auto, plain, static or compiled (CUDA graphs).", hidden=True
        ),
    ) -> None:
        from tunesmith.errors import TunesmithError
        from tunesmith.infer.chat_app import ChatOptions, run_chat

        plugins, stops = _split(with_plugins), _split(stop_words)
        # XTuner writes `--with-plugins calculate solve search` / `--stop-words a b`: the values after the first
        # arrive as extra arguments
        for extra in ctx.args:
            if with_plugins and extra in PLUGIN_NAMES:
                plugins.append(extra)
            elif stop_words:
                stops.append(extra)
            else:
                raise TunesmithError(f"unexpected argument {extra!r}", "see `tunesmith chat --help`")
        run_chat(
            ChatOptions(
                model=model,
                adapter=adapter,
                prompt_template=prompt_template,
                system=system,
                system_template=system_template,
                bits=bits,
                bot_name=bot_name,
                with_plugins=plugins,
                no_streamer=no_streamer,
                lagent=lagent,
                allow_python=allow_python,
                max_steps=max_steps,
                command_stop_word=command_stop_word,
                answer_stop_word=answer_stop_word,
                stop_words=stops,
                offload_folder=offload_folder,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                repetition_penalty=repetition_penalty,
                seed=seed,
                torch_dtype=torch_dtype,
                trust_remote_code=trust_remote_code,
                mode=decode_mode,
            )
        )
