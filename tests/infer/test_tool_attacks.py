"""What a model's Action Input can try against the tools, each stopped (issue 15): secrets of the parent,
writes outside the tool's folder, the network, processes that outlive the tool, arithmetic that would hang or
crash, and tools that raise."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from tests.timeouts import TIMEOUT
from tunesmith.infer.tools import Calculator, PythonInterpreter, Solver, ToolError

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel layers are Linux's")


@pytest.fixture
def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    yield srv.getsockname()[1]
    srv.close()


@pytest.fixture
def python_tool(monkeypatch):
    monkeypatch.setenv("SERPER_API_KEY", "sk-parent-secret-123")
    return PythonInterpreter(timeout=4)


def _observe(tool, code: str) -> str:
    try:
        return tool.run(code)
    except ToolError as exc:
        return f"error: {exc}"


@linux
def test_the_parents_environment_is_out_of_reach(python_tool):
    for code in ("import os; open(f'/proc/{os.getppid()}/environ', 'rb').read()",
                 "import os; os.read(os.open(f'/proc/{os.getppid()}/environ', os.O_RDONLY), 100000)",
                 "import os; open(f'/proc/{os.getppid()}/mem', 'rb').read(16)",
                 "import os; print(dict(os.environ))"):
        assert "sk-parent-secret-123" not in _observe(python_tool, code)


@linux
def test_the_kernel_refuses_the_parents_environ_and_the_network_without_the_audit_hook(python_tool, listener):
    """The layers under the audit hook: a bare interpreter started the way the tool starts one."""
    code = (f"import os, socket\n"
            f"try:\n    print(open(f'/proc/{{os.getppid()}}/environ', 'rb').read())\nexcept OSError as e:\n"
            f"    print('environ refused', e.errno)\n"
            f"try:\n    socket.create_connection(('127.0.0.1', {listener}), timeout=2); print('CONNECTED')\n"
            f"except OSError as e:\n    print('network refused', e.errno)\n")
    out = subprocess.run([sys.executable, "-I", "-c", code], env={}, preexec_fn=python_tool._limits,
                         capture_output=True, text=True, timeout=TIMEOUT).stdout
    assert "sk-parent-secret-123" not in out and "environ refused" in out
    if "network refused" not in out:  # no user namespaces here: the audit hook is the network's only guard
        pytest.skip("this kernel does not give the tool a network namespace")


def test_no_writes_outside_the_tools_folder(python_tool, tmp_path):
    target = tmp_path / "escaped.txt"
    for code in (f"open({str(target)!r}, 'w').write('x')",
                 f"import os; os.open({str(target)!r}, os.O_CREAT | os.O_WRONLY)",
                 f"import shutil; shutil.copyfile('/etc/hostname', {str(target)!r})",
                 f"import pathlib; pathlib.Path({str(target)!r}).write_text('x')"):
        assert "not allowed" in _observe(python_tool, code)
    assert not target.exists()
    assert _observe(python_tool, "open('here.txt', 'w').write('ok'); print(open('here.txt').read())") == "ok"


def test_no_network(python_tool, listener):
    code = f"import socket; socket.create_connection(('127.0.0.1', {listener}), timeout=2); print('CONNECTED')"
    assert "CONNECTED" not in _observe(python_tool, code)


def test_no_processes_outlive_the_tool(python_tool, tmp_path):
    marker = tmp_path / "late.txt"
    start = time.monotonic()
    for code in ("import subprocess; subprocess.Popen(['sleep', '40'], start_new_session=True); print('spawned')",
                 f"import os; os.system('sleep 40; touch {marker}')", "import os; os.fork()",
                 "import ctypes; ctypes.CDLL(None).fork()", "import pty; pty.spawn('sh')"):
        assert "not allowed" in _observe(python_tool, code)
    assert time.monotonic() - start < 10 and not marker.exists()


def test_runaway_code_ends_at_its_limits(python_tool):
    start = time.monotonic()
    assert "time limit" in _observe(python_tool, "while True:\n    pass")
    assert time.monotonic() - start < 8
    assert "MemoryError" in _observe(python_tool, "x = bytearray(4 * 1024**3)")


def test_calculator_answers_or_refuses_and_never_hangs():
    calc = Calculator(timeout=3)
    assert calc.run("9**9999").endswith("(9542 digits)")
    assert "digits" in calc.run("factorial(1000)*factorial(1000)")
    with pytest.raises(ToolError, match="nested too deeply"):
        calc.run("-" * 1500 + "1")
    start = time.monotonic()
    with pytest.raises(ToolError, match="time limit"):
        calc.run("*".join(["9**9999"] * 240) + "%7")
    assert time.monotonic() - start < 6


def test_solver_never_hangs():
    start = time.monotonic()
    with pytest.raises(ToolError, match="time limit"):
        Solver(timeout=3).run("x = 9**9**9")
    assert time.monotonic() - start < 6
    assert Solver().run("x^2 - 4 = 0") == "x = -2; x = 2"


def test_a_tool_that_raises_is_an_observation_not_a_crash(smol_tokenizer):
    from tunesmith.infer.agent import ReActAgent, Step
    from tunesmith.infer.session import ChatSession

    class Broken:
        name, description, example = "broken", "raises", "x"

        def run(self, text):
            raise RuntimeError("tool exploded")

    session = ChatSession.__new__(ChatSession)
    agent = ReActAgent(session, [Broken()], set_system=False)
    step = Step(thought="", action="broken", action_input="x")
    assert "tool exploded" in agent._call(step) and step.error


def test_plugins_survive_what_the_model_writes(smol_tokenizer):
    from tunesmith.infer.plugins import MossPlugins

    plugins = MossPlugins.__new__(MossPlugins)
    plugins.enabled = {"calculate", "solve"}
    plugins.handlers = {"Calculate": Calculator(timeout=2).run, "Solve": Solver(timeout=2).run}
    out = plugins.run_commands('Calculate("' + "-" * 1500 + '1") Solve("x = 9**9**9")')
    assert out.count("=> error:") == 2
