"""Chat on the suite's tiny checkpoints (llama / qwen2 / InternLM-v1 shaped): history as ids, the CLI loop,
and the MOSS plugin flow with a scripted model."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.timeouts import TIMEOUT
from tunesmith.data.conversation import Turn
from tunesmith.data.render import render_prompt_text
from tunesmith.infer.api import load_for_chat
from tunesmith.infer.generate import Generator
from tunesmith.infer.plugins import MossPlugins, plugin_system_text
from tunesmith.infer.repl import PROMPT, RESET_MESSAGE
from tunesmith.infer.sampling import SamplingConfig
from tunesmith.infer.session import ChatSession


@pytest.mark.parametrize("fixture,template", [("tiny_llama", "auto"), ("tiny_qwen2", "qwen_chat"),
                                              ("tiny_internlm", "internlm_chat")])
def test_turn2_prompt_is_the_rendering_of_the_conversation(request, fixture, template):
    model, tok = load_for_chat(str(request.getfixturevalue(fixture)))
    session = ChatSession(Generator(model, tok), template, system="Be kind.",
                          sampling=SamplingConfig(max_new_tokens=8, temperature=0))
    first = session.begin_turn("hello world")
    reply = session.generate()
    session.end_turn()
    second = session.begin_turn("thank you")
    output = session.turns[0].output
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt1 = render_prompt_text(tok, session.template, [Turn("hello world", "")], system="Be kind.")
    full = render_prompt_text(tok, session.template, [Turn("hello world", output), Turn("thank you", "")],
                              system="Be kind.")
    assert first == enc(prompt1)
    # turn 2 = turn 1's prompt ids + the model's own reply ids (never re-tokenised) + the template's text after
    # the reply (end of turn, SEP, next instruction), exactly as the whole conversation renders
    assert full.startswith(prompt1 + output)
    body = second[len(first): len(second) - len(enc(full[len(prompt1 + output):]))]
    assert reply.ids[: len(body)] == body and len(reply.ids) - len(body) <= 2
    assert second == first + body + enc(full[len(prompt1 + output):])
    if "\ufffd" not in output and enc(prompt1 + output) == first + body:
        assert second == enc(full)  # when the reply round-trips, it is the plain rendering's tokens


def test_chat_cli_on_tiny_model(tiny_qwen2):
    stdin = "hello\nworld\n\nRESET\n\nagain\n\n"  # no EXIT: end of input leaves cleanly
    out = subprocess.run([sys.executable, "-m", "tunesmith", "chat", str(tiny_qwen2), "--prompt-template",
                          "qwen_chat", "--max-new-tokens", "6", "--no-streamer", "--stop-words", "zz", "yy"],
                         input=stdin, capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr[-1500:]
    assert out.stdout.count(PROMPT.strip()) == 4 and RESET_MESSAGE in out.stdout


class _Scripted:
    def __init__(self, tokenizer, replies):
        self.tokenizer, self.replies, self.max_positions, self.prompts = tokenizer, list(replies), 4096, []

    def reset(self):
        pass

    def generate(self, prompt_ids, sampling=None, *, stop_words=(), stop_token_ids=(), on_text=None):
        from tunesmith.infer.sampling import GenerationResult

        self.prompts.append(list(prompt_ids))
        text, stop = self.replies.pop(0)
        ids = self.tokenizer(text + stop, add_special_tokens=False)["input_ids"]
        return GenerationResult(ids, text, "stop", stop)


def test_moss_plugin_flow(smol_tokenizer):
    from tunesmith.data.templates import resolve_system

    gen = _Scripted(smol_tokenizer, [
        ('<|Inner Thoughts|>: compute it<eot>\n<|Commands|>: Calculate("12*7"), Solve("x^2=4")', "<eoc>"),
        ("<|MOSS|>: 12*7 is 84.", "<eom>"),
    ])
    system = plugin_system_text(resolve_system("", "moss_sft", bot_name="MOSS"), ["calculate"])
    assert "Equation solver: disabled" in system and "Calculator: enabled" in system
    session = ChatSession(gen, "moss_sft", system=system, bot_name="MOSS")
    reply = MossPlugins(session, ["calculate"]).ask("what is 12*7?")
    assert 'Calculate("12*7") => 84' in reply and 'Solve("x^2=4") => Solve is disabled' in reply
    second_prompt = smol_tokenizer.decode(gen.prompts[1])
    assert second_prompt.endswith(
        '<eoc>\n<|Results|>:\nCalculate("12*7") => 84\nSolve("x^2=4") => Solve is disabled\n<eor>\n'
    )
    assert session.turns[0].output.endswith("<eom>")
