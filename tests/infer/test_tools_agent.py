"""Tools, the ReAct agent (scripted model + a local fake Serper server over real HTTP), session history ids."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from tunesmith.data.conversation import Turn
from tunesmith.data.encode import encode_prompt
from tunesmith.errors import TunesmithError
from tunesmith.infer.agent import ReActAgent, parse_step, tool_argument
from tunesmith.infer.sampling import GenerationResult
from tunesmith.infer.session import ChatSession
from tunesmith.infer.tools import Calculator, PythonInterpreter, Solver, ToolError, WebSearch, calculate, solve


@pytest.mark.parametrize("bad", ["__import__('os')", "__import__('os').system('ls')", "().__class__.__bases__",
                                 "open('/etc/passwd')", "9**9**9", "[x for x in range(9)]", "lambda: 1", "x"])
def test_calculator_refuses_code(bad):
    with pytest.raises(ToolError):
        calculate(bad)


def test_calculator_and_solver():
    assert calculate("(3 + 4.5) * 2^3") == "60"
    assert calculate("sqrt(16); 10 // 3") == "4; 3"
    assert solve("x^2 - 4 = 0") == "x = -2; x = 2"
    assert solve("x + y = 3; x - y = 1") == "x = 2, y = 1"
    with pytest.raises(ToolError):
        solve("__import__('os').system('echo hi') = 1")


def test_python_tool_limits(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "s3cret")
    py = PythonInterpreter(timeout=1.5)
    assert py.run("x = [1, 2, 3]\nsum(x)") == "6"
    assert "s3cret" not in py.run("import os\nprint(dict(os.environ))")
    start = time.time()
    with pytest.raises(ToolError, match="time limit"):
        py.run("while True:\n    pass")
    assert time.time() - start < 5


class _Serper(BaseHTTPRequestHandler):
    queries: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Serper.queries.append((body["q"], self.headers.get("X-API-KEY")))
        payload = {"organic": [{"title": "Paris", "snippet": "Paris is the capital of France."}]}
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_serper(monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _Serper)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("SERPER_API_KEY", "test-key")
    monkeypatch.setenv("SERPER_BASE_URL", f"http://127.0.0.1:{server.server_port}")
    _Serper.queries.clear()
    yield server
    server.shutdown()
    server.server_close()


class ScriptedGenerator:
    """Stands in for Generator: replies from a script, records the prompts."""

    def __init__(self, tokenizer, replies, max_positions=4096):
        self.tokenizer, self.replies, self.max_positions = tokenizer, list(replies), max_positions
        self.prompts: list[list[int]] = []

    def reset(self):
        pass

    def generate(self, prompt_ids, sampling=None, *, stop_words=(), stop_token_ids=(), on_text=None):
        self.prompts.append(list(prompt_ids))
        text = self.replies.pop(0)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        return GenerationResult(ids, text, "stop", self.tokenizer.eos_token)


def test_agent_tool_round_trip_over_http(smol_tokenizer, fake_serper):
    script = ["Thought: I should search.\nAction: search\nAction Input: {'query': 'capital of France'}\n",
              "Thought: I now know the final answer\nFinal Answer: Paris\n"]
    gen = ScriptedGenerator(smol_tokenizer, script)
    session = ChatSession(gen, "chatml")
    steps = []
    agent = ReActAgent(session, [WebSearch(), Calculator(), Solver()], on_step=lambda n, s: steps.append(s))
    result = agent.run("What is the capital of France?")
    assert result.answer == "Paris" and result.finished
    assert _Serper.queries == [("capital of France", "test-key")]
    assert steps[0].action == "search" and "Paris is the capital" in steps[0].response
    # the tool result went back as the next turn's system text, in the msagent training layout
    assert "Response:[1] Paris: Paris is the capital of France." in smol_tokenizer.decode(gen.prompts[1])
    assert session.turns[1] == Turn("", script[1], "Response:" + steps[0].response + "\n")


def test_agent_feeds_back_malformed_actions_and_network_errors(smol_tokenizer, monkeypatch):
    monkeypatch.setenv("SERPER_API_KEY", "k")
    monkeypatch.setenv("SERPER_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    script = ["Action: teleport\nAction Input: mars\n", "Action: search\nAction Input: x\n",
              "Action: calculate\nAction Input: __import__('os')\n", "Action: calculate\nAction Input: 6*7\n",
              "just some free text"]
    session = ChatSession(ScriptedGenerator(smol_tokenizer, script), "chatml")
    agent = ReActAgent(session, [WebSearch(timeout=2), Calculator()], max_steps=6)
    result = agent.run("q")
    responses = [s.response for s in result.steps]
    assert "unknown tool" in responses[0]
    assert "web search failed" in responses[1]
    assert "not allowed" in responses[2] and responses[3] == "42"
    assert result.answer == "just some free text"


def test_agent_stops_at_max_steps(smol_tokenizer):
    script = ["Action: calculate\nAction Input: 1+1\n"] * 5
    agent = ReActAgent(ChatSession(ScriptedGenerator(smol_tokenizer, script), "chatml"), [Calculator()], max_steps=2)
    result = agent.run("loop")
    assert not result.finished and len(result.steps) == 3


def test_parse_step_and_argument():
    s = parse_step("Thought: t\nAction: calculate\nAction Input: {\"expression\": \"1+2\"}")
    assert (s.thought, s.action, tool_argument(s.action_input)) == ("t", "calculate", "1+2")
    assert parse_step("Final Answer：好").final_answer == "好"


def test_search_without_key_says_how_to_get_one(monkeypatch):
    monkeypatch.delenv("SERPER_API_KEY", raising=False)
    with pytest.raises(TunesmithError) as err:
        WebSearch()
    assert "serper.dev" in str(err.value)


@pytest.mark.parametrize("template", ["chatml", "auto", "qwen_chat", "default"])
def test_history_ids_equal_template_rendering(smol_tokenizer, template):
    gen = ScriptedGenerator(smol_tokenizer, ["Paris is the capital.", "Rome."])
    session = ChatSession(gen, template, system="Be brief.")
    session.ask("Capital of France?")
    session.ask("And Italy?")
    turns = [Turn("Capital of France?", "Paris is the capital."), Turn("And Italy?", "")]
    assert gen.prompts[1] == encode_prompt(smol_tokenizer, session.template, turns, system="Be brief.")
    assert gen.prompts[1][: len(gen.prompts[0])] == gen.prompts[0]  # turn 2 extends turn 1's ids


def test_history_keeps_generated_ids_on_a_real_model(smol_tokenizer, tiny_model):
    from tunesmith.infer.generate import Generator
    from tunesmith.infer.sampling import SamplingConfig

    session = ChatSession(Generator(tiny_model, smol_tokenizer), "chatml",
                          sampling=SamplingConfig(max_new_tokens=10, temperature=0))
    first = list(session.begin_turn("hi"))
    result = session.generate()
    session.end_turn()
    second = session.begin_turn("again")
    assert second[: len(first) + len(result.ids)] == first + result.ids  # never re-tokenised


def test_context_overflow_keeps_recent_turns(smol_tokenizer):
    notes = []
    gen = ScriptedGenerator(smol_tokenizer, ["answer number %d " % i * 5 for i in range(8)], max_positions=160)
    from tunesmith.infer.sampling import SamplingConfig

    session = ChatSession(gen, "chatml", system="S", sampling=SamplingConfig(max_new_tokens=40), notice=notes.append)
    for i in range(6):
        session.ask(f"question {i}")
    assert notes and "dropped" in notes[0]
    text = smol_tokenizer.decode(gen.prompts[-1])
    assert "question 5" in text and "question 0" not in text and text.startswith("<|im_start|>system\nS")
    assert len(gen.prompts[-1]) <= 160 - 40
