"""A Python interpreter tool, opt-in (`--allow-python`).

The code runs in a separate process (`python -I`, isolated mode) with an empty environment (no API keys or
tokens of the parent), in a fresh temporary folder, under CPU-time, memory, file-size and process limits set
with `resource.setrlimit`, and a wall-clock time-out after which its whole process group is killed. The value
of a final expression is printed, as in the interactive interpreter. This is a guard against accidents and
runaway code, not a security sandbox: the code can still read files the user can read.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile

from tunesmith.infer.tools.base import ToolError

_RUNNER = r"""
import ast, sys
source = sys.stdin.read()
tree = ast.parse(source, "<tool>", "exec")
last = None
if tree.body and isinstance(tree.body[-1], ast.Expr):
    last = ast.Expression(tree.body.pop().value)
namespace = {"__name__": "__main__"}
exec(compile(tree, "<tool>", "exec"), namespace)
if last is not None:
    value = eval(compile(last, "<tool>", "eval"), namespace)
    if value is not None:
        print(repr(value))
"""


def _strip_fences(code: str) -> str:
    code = code.strip()
    if code.startswith("```"):
        code = code.split("\n", 1)[1] if "\n" in code else ""
        if code.rstrip().endswith("```"):
            code = code.rstrip()[:-3]
    return code


class PythonInterpreter:
    name = "python"
    description = "Python interpreter: runs Python code and returns what it prints (and the last expression's value)."
    example = "print(sum(range(10)))"

    def __init__(self, timeout: float = 10.0, memory_mb: int = 512, max_output: int = 4000):
        self.timeout = timeout
        self.memory_mb = memory_mb
        self.max_output = max_output

    def _limits(self) -> None:  # runs in the child before exec
        import resource

        cpu = max(1, int(self.timeout) + 1)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        mem = self.memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024 * 1024, 16 * 1024 * 1024))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    def run(self, text: str) -> str:
        code = _strip_fences(text)
        if not code:
            raise ToolError("no code given")
        with tempfile.TemporaryDirectory(prefix="tunesmith-py-") as workdir:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-c", _RUNNER],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    cwd=workdir,
                    env={},
                    start_new_session=True,
                    preexec_fn=self._limits if os.name == "posix" else None,
                )
            except OSError as exc:
                raise ToolError(f"cannot start Python: {exc}") from None
            try:
                out, _ = proc.communicate(code.encode(), timeout=self.timeout)
            except subprocess.TimeoutExpired:
                self._kill(proc)
                raise ToolError(f"the code was stopped after {self.timeout:g}s (time limit)") from None
        text_out = out.decode("utf-8", "replace")
        if len(text_out) > self.max_output:
            text_out = text_out[: self.max_output] + f"\n... ({len(text_out) - self.max_output} more characters)"
        if proc.returncode < 0:
            sig = signal.Signals(-proc.returncode).name
            reason = "time limit" if sig in ("SIGXCPU", "SIGKILL") else sig
            raise ToolError(f"the code was killed ({reason})\n{text_out}".strip())
        if proc.returncode != 0:
            # the traceback is the useful observation; keep its last lines
            tail = "\n".join(text_out.strip().splitlines()[-6:])
            raise ToolError(f"the code raised an error:\n{tail}")
        return text_out.strip() or "(no output)"

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        proc.communicate()
