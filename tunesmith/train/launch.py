"""Multi-GPU / multi-node launch, as XTuner: NPROC_PER_NODE / NNODES / NODE_RANK / ADDR / PORT -> torchrun.

`tunesmith train ...` run by a user with NPROC_PER_NODE>1 (or NNODES>1) re-launches itself as
``python -m torch.distributed.run --nnodes N --node_rank R --nproc_per_node P --master_addr A
--master_port P -m tunesmith train ...``; the children see torchrun's RANK / WORLD_SIZE / LOCAL_RANK and
train. Already under torchrun (LOCAL_RANK set) nothing is re-launched.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

from tunesmith.errors import TunesmithError


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise TunesmithError(f"environment variable {name}={raw!r} is not a whole number") from exc
    if value < (0 if name == "NODE_RANK" else 1):
        raise TunesmithError(f"environment variable {name}={raw!r} is out of range")
    return value


def torchrun_command(args: list[str]) -> list[str] | None:
    """The torchrun command line for `tunesmith train args...`, or None when no re-launch is needed."""
    if "LOCAL_RANK" in os.environ:  # we are a torchrun child already
        return None
    nproc = _int_env("NPROC_PER_NODE", 1)
    nnodes = _int_env("NNODES", 1)
    if nproc <= 1 and nnodes <= 1:
        return None
    node_rank = _int_env("NODE_RANK", 0)
    addr = os.environ.get("ADDR", "127.0.0.1")
    port = os.environ.get("PORT") or str(random.randint(20000, 29999))
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node_rank={node_rank}",
            f"--nproc_per_node={nproc}", f"--master_addr={addr}", f"--master_port={port}",
            "-m", "tunesmith", "train", *args]


def relaunch(args: list[str]) -> int | None:
    """Re-launch through torchrun when the environment asks for it; returns its exit code (else None)."""
    command = torchrun_command(args)
    if command is None:
        return None
    print("launching: " + " ".join(command[1:]), file=sys.stderr, flush=True)
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 130
