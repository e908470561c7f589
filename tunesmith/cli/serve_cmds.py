"""`tunesmith serve MODEL` (OpenAI-compatible API) and `tunesmith web MODEL` (browser chat page)."""

from __future__ import annotations

import os
from typing import Optional

import typer

SERVE_HELP = """\
Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models, /health).

Binds 127.0.0.1 unless --host says otherwise. Requests that arrive together are decoded as one batch.

\b
  tunesmith serve builtin:smollm2-135m-instruct --port 8000
  tunesmith serve ./merged --prompt-template internlm_chat --api-key sk-local
  # then, from Python:
  #   OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="sk-local").chat.completions.create(
  #       model="merged", messages=[{"role": "user", "content": "Hi"}])
"""

WEB_HELP = """\
Open a chat page for a model in the browser (streaming, system prompt, sampling controls, reset).

\b
  tunesmith web builtin:smollm2-135m-instruct
  tunesmith web ./internlm-chat-7b --adapter ./hf --prompt-template internlm_chat --port 7860
"""


def _name_of(model: str, adapter: str | None) -> str:
    base = model.split(":", 1)[1] if model.startswith("builtin:") else os.path.basename(os.path.normpath(model))
    return f"{base}+{os.path.basename(os.path.normpath(adapter))}" if adapter else base


def _engine(model, adapter, prompt_template, system, bits, torch_dtype, trust_remote_code, max_batch):
    from tunesmith.infer.engine import Engine
    from tunesmith.models import resolve_model_path

    resolve_model_path(model)  # a wrong path is said before anything else is printed
    typer.echo(f"loading {model}" + (f" with adapter {adapter}" if adapter else "") + " ...", err=True)
    return Engine.load(model, adapter=adapter, prompt_template=prompt_template, system=system or "", bits=bits,
                       torch_dtype=torch_dtype, trust_remote_code=trust_remote_code, max_batch=max_batch)


def _check_host(host: str, api_key: str | None) -> None:
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        typer.echo(f"warning: listening on {host} without --api-key: anyone who can reach it can use the model",
                   err=True)


def _check_port(host: str, port: int) -> None:
    """Before the model loads: the port is a port, and free on that address."""
    import errno
    import socket

    from tunesmith.errors import TunesmithError

    if not 1 <= port <= 65535:
        raise TunesmithError(f"--port {port} is not a TCP port", "use a number from 1 to 65535, e.g. --port 8000")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise TunesmithError(f"--host {host!r} is not an address of this machine ({exc.strerror})",
                             "use 127.0.0.1, 0.0.0.0 or an address of one of its interfaces") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers themselves bind
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise TunesmithError(f"port {port} on {host} is already in use",
                                     "stop what is listening there or pass another --port") from None
            raise TunesmithError(f"cannot listen on {host}:{port}: {exc.strerror}",
                                 "use an address of this machine and a port you may open (above 1023)") from None


def register(app: typer.Typer) -> None:
    @app.command("serve", help=SERVE_HELP)
    def serve(
        model: str = typer.Argument(..., help="Model folder, hub id, .gguf file or builtin:smollm2-135m-instruct."),
        adapter: Optional[str] = typer.Option(None, "--adapter", help="PEFT adapter folder (from convert pth_to_hf)."),
        prompt_template: Optional[str] = typer.Option(
            None, "--prompt-template", help="Template name (tunesmith list-template) or 'auto' (the tokenizer's). "
            "Default: the adapter's training template with --adapter, else auto."),
        system: Optional[str] = typer.Option(None, "--system", help="Default system prompt (a request's own wins)."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback unless you say so)."),
        port: int = typer.Option(8000, "--port", help="TCP port."),
        api_key: Optional[str] = typer.Option(
            None, "--api-key", envvar="TUNESMITH_API_KEY",
            help="Require 'Authorization: Bearer KEY' on /v1 routes (or set TUNESMITH_API_KEY)."),
        model_name: Optional[str] = typer.Option(None, "--model-name", help="Name shown in /v1/models."),
        max_batch: int = typer.Option(16, "--max-batch", help="Most requests decoded together."),
        bits: Optional[int] = typer.Option(None, "--bits", help="Load in 4-bit (NF4) or 8-bit (needs bitsandbytes)."),
        torch_dtype: str = typer.Option("auto", "--torch-dtype", help="auto, fp16, bf16 or fp32."),
        trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run the model folder's own code."),
    ) -> None:
        from tunesmith.serve.api import create_app, run_server

        _check_port(host, port)
        _check_host(host, api_key)
        engine = _engine(model, adapter, prompt_template, system, bits, torch_dtype, trust_remote_code, max_batch)
        name = model_name or _name_of(model, adapter)
        typer.echo(f"serving {name} on http://{host}:{port}/v1" + (" (API key required)" if api_key else ""),
                   err=True)
        try:
            run_server(create_app(engine, model_name=name, api_key=api_key), host=host, port=port)
        finally:
            engine.close()

    @app.command("web", help=WEB_HELP)
    def web(
        model: str = typer.Argument(..., help="Model folder, hub id, .gguf file or builtin:smollm2-135m-instruct."),
        adapter: Optional[str] = typer.Option(None, "--adapter", help="PEFT adapter folder (from convert pth_to_hf)."),
        prompt_template: Optional[str] = typer.Option(
            None, "--prompt-template", help="Template name (tunesmith list-template) or 'auto' (the tokenizer's). "
            "Default: the adapter's training template with --adapter, else auto."),
        system: Optional[str] = typer.Option(None, "--system", help="Initial text of the system prompt box."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback unless you say so)."),
        port: int = typer.Option(7860, "--port", help="TCP port."),
        max_new_tokens: int = typer.Option(512, "--max-new-tokens", help="Initial answer length limit."),
        bits: Optional[int] = typer.Option(None, "--bits", help="Load in 4-bit (NF4) or 8-bit (needs bitsandbytes)."),
        torch_dtype: str = typer.Option("auto", "--torch-dtype", help="auto, fp16, bf16 or fp32."),
        trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run the model folder's own code."),
    ) -> None:
        from tunesmith.serve.web import build_demo, launch

        _check_port(host, port)
        _check_host(host, None)
        engine = _engine(model, adapter, prompt_template, system, bits, torch_dtype, trust_remote_code, 16)
        demo = build_demo(engine, model_name=_name_of(model, adapter), system=system or "",
                          max_new_tokens=max_new_tokens)
        typer.echo(f"chat page on http://{host}:{port}", err=True)
        try:
            launch(demo, host=host, port=port, block=True)
        finally:
            engine.close()
