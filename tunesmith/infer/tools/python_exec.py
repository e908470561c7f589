"""A Python interpreter tool, opt-in (`--allow-python`), in layers of isolation.

The code a model writes runs in a separate process (``python -I``, isolated mode, an empty environment) in a
fresh temporary folder, and:

1. **cannot read this process's secrets**: this process is made non-dumpable (``PR_SET_DUMPABLE`` 0), so the
   kernel refuses ``/proc/<pid>/environ`` and ``/proc/<pid>/mem`` to any process without ``CAP_SYS_PTRACE``,
   and the child runs in a new user namespace where it has no capability over this one (root included);
2. **has no network**: the new network namespace has no interface but a down loopback (where the kernel allows
   user namespaces; elsewhere the audit hook below refuses sockets);
3. **cannot start processes or write outside its folder**: an audit hook installed before the code runs refuses
   process creation (fork, exec, spawn, subprocess, system), sockets, loading native code (ctypes), and any
   ``open`` for writing outside the folder; ``RLIMIT_NPROC`` is 0 where it applies;
4. **ends on time**: CPU, memory, file-size and core limits (``setrlimit``), its own session, and a wall-clock
   limit after which the whole process group is killed and the pipes are read against a deadline.

The value of a final expression is printed, as in the interactive interpreter. Layers 1 and 2 are the kernel's;
layer 3 is Python's audit hooks, which the Python documentation does not call a sandbox, and which here only
backs up the kernel's. Reading files the user can read remains possible: do not give an agent you do not trust
a machine with secrets in its files.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import tempfile
import time

from tunesmith.infer.tools.base import ToolError

# Runs in the child before the tool's code: the audit hook, then the code (last expression printed).
_RUNNER = r"""
import ast, os, sys
_home = os.path.realpath(os.getcwd())
_blocked = {"os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "os.kill", "os.killpg",
            "subprocess.Popen", "pty.spawn", "socket.__new__", "socket.bind", "socket.connect", "socket.getaddrinfo",
            "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "os.chdir", "os.chroot", "sys.addaudithook",
            "os.putenv", "os.unsetenv", "sys.remote_exec", "os.startfile"}
_writes = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.link", "os.symlink", "os.truncate", "os.chmod",
           "os.chown", "os.utime", "shutil.copyfile", "shutil.copytree", "shutil.move", "shutil.rmtree"}

def _inside(path):
    try:
        real = os.path.realpath(os.fsdecode(path) if not isinstance(path, int) else "")
    except (TypeError, ValueError):
        return False
    return real == _home or real.startswith(_home + os.sep)

def _hook(event, args):
    if event in _blocked:
        raise PermissionError(f"{event} is not allowed in this tool")
    if event == "open":
        path, mode, flags = (list(args) + [None, None, 0])[:3]
        write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
        writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (flags or 0) & write_flags
        name = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else ""
        if name.startswith("/proc/") and not name.startswith(("/proc/self/", f"/proc/{os.getpid()}/")):
            raise PermissionError("other processes' /proc files are not readable here")
        if writing and not isinstance(path, int) and not _inside(path):
            raise PermissionError(f"writing outside the tool's folder is not allowed: {path!r}")
    elif event in _writes:
        for path in args[:2]:
            if isinstance(path, (str, bytes, os.PathLike)) and not _inside(path):
                raise PermissionError(f"{event} outside the tool's folder is not allowed: {path!r}")

sys.addaudithook(_hook)
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

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38


def _libc():
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name, use_errno=True) if name else None


def protect_this_process() -> bool:
    """Make this process non-dumpable: no other process without CAP_SYS_PTRACE may read its environment or
    memory through /proc. Returns whether it took."""
    libc = _libc()
    return bool(libc is not None and sys.platform.startswith("linux") and libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0)


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
        self.protected = protect_this_process()

    def _limits(self) -> None:  # runs in the child between fork and exec
        import resource

        libc = _libc()
        if libc is not None and sys.platform.startswith("linux"):
            libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
            uid, gid = os.getuid(), os.getgid()
            if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:  # no capability over this namespace, no network
                for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                    try:
                        with open(f"/proc/self/{name}", "w") as fh:
                            fh.write(text)
                    except OSError:
                        pass
        cpu = max(1, int(self.timeout) + 1)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        mem = self.memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024 * 1024, 16 * 1024 * 1024))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))

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
            start = time.monotonic()
            try:
                out, _ = proc.communicate(code.encode(), timeout=self.timeout)
            except subprocess.TimeoutExpired:
                self._kill(proc)
                raise ToolError(f"the code was stopped after {self.timeout:g}s (time limit)") from None
            finally:
                if proc.poll() is None and time.monotonic() - start >= self.timeout:
                    self._kill(proc)
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
        """Kill the process group, then stop reading: a pipe held open by anything left must not block us."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
