"""A browser chat page (gradio) over an `Engine`: streaming answers, a system prompt box, sampling controls
and a reset button. Closing the page or pressing Stop cancels the generation.

What the user types is shown as text (HTML-escaped in the page's history, unescaped again for the model): a
message with ``<script>`` in it is a message, not markup. Answers render as markdown, with gradio's HTML
sanitizing.

    demo = build_demo(Engine.load("builtin:smollm2-135m-instruct"), model_name="smollm2")
    launch(demo, host="127.0.0.1", port=7860)
"""

from __future__ import annotations

import html
import os
from collections.abc import Iterator

from tunesmith.infer.engine import Engine
from tunesmith.infer.sampling import SamplingConfig

# no calls home from a local demo
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return "" if content is None else str(content)


def to_messages(history: list, system: str) -> list[dict]:
    """Gradio's chat history (messages format) -> OpenAI-style messages for the engine."""
    out = [{"role": "system", "content": system}] if system.strip() else []
    for item in history:
        role = item.get("role") if isinstance(item, dict) else getattr(item, "role", None)
        content = item.get("content") if isinstance(item, dict) else getattr(item, "content", None)
        if role == "user":  # shown escaped (see the module docstring); the model gets what was typed
            out.append({"role": role, "content": html.unescape(_text_of(content))})
        elif role == "assistant":
            out.append({"role": role, "content": _text_of(content)})
    return out


def build_demo(engine: Engine, *, model_name: str, system: str = "", max_new_tokens: int = 512):
    import gradio as gr

    def respond(message: str, history: list, system_prompt: str, temperature: float, top_p: float,
                max_tokens: int) -> Iterator[tuple[list, str]]:
        message = (message or "").strip()
        if not message:
            yield history, ""
            return
        history = list(history or []) + [{"role": "user", "content": html.escape(message)}]
        messages = to_messages(history, system_prompt or "")
        history.append({"role": "assistant", "content": ""})
        yield history, ""
        sampling = SamplingConfig(max_new_tokens=int(max_tokens), temperature=float(temperature), top_k=0,
                                  top_p=float(top_p), seed=0)
        answer = ""
        for piece in engine.stream(messages, sampling):
            answer += piece
            history[-1] = {"role": "assistant", "content": answer}
            yield history, ""

    with gr.Blocks(title=f"tunesmith · {model_name}", analytics_enabled=False) as demo:
        gr.Markdown(f"## tunesmith chat · `{model_name}`")
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=420, feedback_options=None)
                with gr.Row():
                    box = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=5,
                                     elem_id="message", autofocus=True)
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                with gr.Row():
                    stop = gr.Button("Stop", elem_id="stop")
                    reset = gr.Button("Reset", elem_id="reset")
            with gr.Column(scale=1):
                system_box = gr.Textbox(label="System prompt", value=system, lines=4, elem_id="system")
                temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)",
                                        elem_id="temperature")
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p", elem_id="top_p")
                max_tokens = gr.Slider(1, 4096, value=max_new_tokens, step=1, label="Max new tokens",
                                       elem_id="max_tokens")
        inputs = [box, chatbot, system_box, temperature, top_p, max_tokens]
        ev1 = box.submit(respond, inputs, [chatbot, box])
        ev2 = send.click(respond, inputs, [chatbot, box])
        stop.click(None, None, None, cancels=[ev1, ev2])
        reset.click(lambda: ([], ""), None, [chatbot, box], cancels=[ev1, ev2])
    demo.queue(default_concurrency_limit=16)
    return demo


def launch(demo, *, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Start the page's server (gradio's own uvicorn) on host:port."""
    return demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, share=False,
                       ssr_mode=False, quiet=not block, show_error=True, footer_links=[])
