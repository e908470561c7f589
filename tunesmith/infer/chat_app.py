"""`tunesmith chat` as a function: check the flags, load the model, run the loop (plain chat, MOSS plugins, or
the ReAct agent). The CLI module only parses flags into `ChatOptions`."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TextIO

from tunesmith.errors import TunesmithError


@dataclass
class ChatOptions:
    model: str
    adapter: str | None = None
    prompt_template: str | None = None
    system: str | None = None
    system_template: str | None = None
    bits: int | None = None
    bot_name: str = "BOT"
    with_plugins: list[str] = field(default_factory=list)
    no_streamer: bool = False
    lagent: bool = False
    allow_python: bool = False
    max_steps: int = 6
    command_stop_word: str | None = None
    answer_stop_word: str | None = None
    stop_words: list[str] = field(default_factory=list)
    offload_folder: str | None = None
    max_new_tokens: int = 2048
    temperature: float = 0.1
    top_k: int = 40
    top_p: float = 0.75
    repetition_penalty: float = 1.0
    seed: int = 0
    torch_dtype: str = "auto"
    trust_remote_code: bool = False
    mode: str = "auto"  # generator mode (plain / static / compiled)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def check_options(opts: ChatOptions) -> None:
    """Every flag problem, before the (slow) model load."""
    from tunesmith.data.templates import get_system_template, get_template
    from tunesmith.infer.api import _check_bits, _torch_dtype

    if opts.system and opts.system_template:
        raise TunesmithError("--system and --system-template cannot be used together", "keep one of them")
    if opts.prompt_template not in (None, "raw", "none"):
        get_template(opts.prompt_template)
    if opts.system_template:
        get_system_template(opts.system_template)
    _check_bits(opts.bits)
    _torch_dtype(opts.torch_dtype, "cpu")
    if opts.with_plugins and opts.lagent:
        raise TunesmithError("--with-plugins and --lagent are two different tool flows", "choose one")
    if opts.with_plugins:
        from tunesmith.infer.plugins import check_plugin_setup

        check_plugin_setup(opts.with_plugins, opts.prompt_template, opts.system_template)
    if opts.lagent or "search" in opts.with_plugins:
        from tunesmith.infer.tools.search import serper_key

        serper_key(required=True)
    if opts.allow_python and not opts.lagent:
        raise TunesmithError("--allow-python only applies to the agent", "add --lagent")
    if opts.max_new_tokens < 1:
        raise TunesmithError("--max-new-tokens must be at least 1")
    if not 0 < opts.top_p <= 1:
        raise TunesmithError(f"--top-p must be in (0, 1], not {opts.top_p}")


def run_chat(opts: ChatOptions, *, stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
    import torch

    from tunesmith.data.templates import resolve_system
    from tunesmith.infer.api import load_for_chat
    from tunesmith.infer.generate import Generator
    from tunesmith.infer.repl import run_repl
    from tunesmith.infer.sampling import SamplingConfig
    from tunesmith.infer.session import ChatSession
    from tunesmith.infer.stops import merge_stop_words
    from tunesmith.infer.trained_prompt import choose_prompt, read_trained_prompt

    check_options(opts)
    out = stdout or sys.stdout
    torch.manual_seed(opts.seed)
    from tunesmith.models import resolve_model_path

    resolve_model_path(opts.model)  # a wrong path is said before anything else is printed
    _say(f"loading {opts.model}" + (f" + adapter {opts.adapter}" if opts.adapter else "") + " ...")
    model, tokenizer = load_for_chat(
        opts.model, adapter=opts.adapter, bits=opts.bits, torch_dtype=opts.torch_dtype,
        offload_folder=opts.offload_folder, trust_remote_code=opts.trust_remote_code,
    )
    generator = Generator(model, tokenizer, mode=opts.mode)
    sampling = SamplingConfig(opts.max_new_tokens, opts.temperature, opts.top_k, opts.top_p,
                              opts.repetition_penalty, opts.seed)
    system = resolve_system(opts.system or "", opts.system_template, bot_name=opts.bot_name)
    extra_stops = merge_stop_words(opts.stop_words, [opts.command_stop_word or "", opts.answer_stop_word or ""])
    if opts.with_plugins:
        from tunesmith.infer.plugins import ANSWER_STOP, COMMAND_STOP, plugin_system_text

        system = plugin_system_text(system, opts.with_plugins)
        extra_stops = merge_stop_words(opts.stop_words, [opts.command_stop_word or COMMAND_STOP,
                                                          opts.answer_stop_word or ANSWER_STOP])
    template, system = choose_prompt(opts.adapter, opts.prompt_template, system, warn=_say)
    session = ChatSession(generator, template, system=system, bot_name=opts.bot_name,
                          sampling=sampling, stop_words=extra_stops)
    trained = read_trained_prompt(opts.adapter)
    origin = " (the adapter's)" if trained and opts.prompt_template in (None, trained.template) else ""
    _say(f"model ready: template {session.template.name}{origin}, decoding {generator.mode} on {generator.device}")

    def stream_piece(piece: str) -> None:
        out.write(piece)
        out.flush()

    on_text = None if opts.no_streamer else stream_piece

    if opts.lagent:
        from tunesmith.infer.agent import ReActAgent, format_step
        from tunesmith.infer.tools import build_tools

        tools = build_tools(("search", "calculate", "solve"), allow_python=opts.allow_python)
        agent = ReActAgent(session, tools, max_steps=opts.max_steps,
                           on_step=lambda n, step: (out.write(format_step(n, step) + "\n"), out.flush()))

        def answer(text: str) -> None:
            result = agent.run(text)
            if not result.finished:
                out.write(result.answer + "\n")
            out.flush()

    elif opts.with_plugins:
        from tunesmith.infer.plugins import MossPlugins
        from tunesmith.infer.tools.search import WebSearch

        plugins = MossPlugins(session, opts.with_plugins,
                              search=WebSearch() if "search" in opts.with_plugins else None)

        def answer(text: str) -> None:
            reply = plugins.ask(text, on_text=on_text, on_results=None if on_text is None else stream_piece)
            if on_text is None:
                out.write(reply)
            out.write("\n")
            out.flush()

    else:

        def answer(text: str) -> None:
            result = session.ask(text, on_text=on_text)
            if on_text is None:
                out.write(result.text)
            out.write("\n")
            out.flush()

    def on_error(exc: Exception) -> bool:
        if isinstance(exc, TunesmithError):
            _say(f"error: {exc}")
            session.abort_turn()
            return True
        return False

    run_repl(answer, session.reset, stdin=stdin, stdout=out, on_error=on_error, on_interrupt=session.abort_turn)
