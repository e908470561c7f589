"""Run a tool's computation where it cannot take the agent down: a forked child with a wall-clock deadline and
CPU and memory limits.

A model writes the tool's input. Arithmetic like ``9**9**9`` or a solver asked for ``x = 9**9**9`` can run for
hours or fill the memory, and deep nesting raises ``RecursionError``. ``run_bounded(fn, text)`` forks (cheap:
the child shares the parent's pages until it writes), runs ``fn(text)`` in the child under ``RLIMIT_AS`` and
``RLIMIT_CPU``, and reads its answer from a pipe against the deadline; at the deadline the child is killed. The
answer travels as JSON (a string, or the error's message), never as a pickle. Any exception becomes a
:class:`ToolError`, which the agent shows the model as the observation.

On systems without ``fork`` the function runs in-process (the tools' own size checks still apply).
"""

from __future__ import annotations

import json
import os
import select
import signal
import time
from collections.abc import Callable

from tunesmith.infer.tools.base import ToolError


def _limit_child(memory_mb: int, cpu_seconds: float) -> None:
    import resource

    mem = memory_mb * 1024 * 1024
    current = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem if current == resource.RLIM_INFINITY else min(mem, current)))
    cpu = max(1, int(cpu_seconds) + 1)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_bounded(fn: Callable[[str], str], text: str, *, timeout: float = 5.0, memory_mb: int = 1024) -> str:
    """``fn(text)`` in a forked child with ``timeout`` seconds and ``memory_mb`` of address space above what the
    parent already maps; its return value, or a ToolError."""
    if not hasattr(os, "fork"):
        return _call(fn, text)
    mapped_mb = _mapped_mb()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: compute, write one JSON line, leave without running the parent's exit handlers
        code = 0
        try:
            os.close(read_fd)
            _limit_child(mapped_mb + memory_mb, timeout)
            try:
                payload = {"ok": fn(text)}
            except ToolError as exc:
                payload = {"error": str(exc)}
            except MemoryError:
                payload = {"error": "the computation needs more memory than a tool may use"}
            except RecursionError:
                payload = {"error": "the input is nested too deeply"}
            except Exception as exc:  # noqa: BLE001 - every failure is an observation for the model
                payload = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            os.write(write_fd, json.dumps(payload).encode())
        except BaseException:  # noqa: BLE001 - the child must never return into the parent's code
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ToolError(f"the computation was stopped after {timeout:g}s (time limit)")
            ready, _, _ = select.select([read_fd], [], [], left)
            if not ready:
                continue
            data = os.read(read_fd, 65536)
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(read_fd)
        _reap(pid)
    raw = b"".join(chunks)
    if not raw:
        raise ToolError("the computation ran out of its time or memory limit")
    payload = json.loads(raw)
    if "error" in payload:
        raise ToolError(payload["error"])
    return payload["ok"]


def _call(fn: Callable[[str], str], text: str) -> str:
    try:
        return fn(text)
    except ToolError:
        raise
    except (MemoryError, RecursionError, ValueError, OverflowError, ArithmeticError) as exc:
        raise ToolError(f"{type(exc).__name__}: {exc}"[:500]) from None


def _reap(pid: int) -> None:
    """Kill the child if it still runs and collect it."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _mapped_mb() -> int:
    """The parent's virtual size in MiB (the child starts with the same mappings, so its limit adds to this)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[0])
        return pages * os.sysconf("SC_PAGE_SIZE") // 2**20
    except (OSError, ValueError):
        return 0
