"""Checkpoints: ``work_dir/epoch_N.pth/`` and ``work_dir/iter_N.pth/`` folders (docs/internals.md).

::

    meta.json                      format, version, method, epoch, step, config_hash, base_model, data position
    config.yaml                    the resolved config
    adapter_model.safetensors      LoRA / QLoRA: PEFT's own layout (get_peft_model_state_dict keys)
    adapter_config.json
    model.safetensors              full fine-tuning: HF state-dict names of the base model
    optimizer.safetensors          optimizer tensors ("state.<param index>.<name>"); under ZeRO with several
                                   ranks one file per rank: optimizer.rank<R>.safetensors
    trainer_state.json             optimizer scalars + param groups, schedule, RNG states (per rank), data
                                   position, grad scaler

No pickle anywhere. A checkpoint is written into a temporary sibling folder and renamed into place
(`tunesmith.files.atomic_path`), so a kill or a full disk at any moment leaves the previous one intact;
`last_checkpoint` (a text file with the newest checkpoint's path) is replaced atomically after that.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tunesmith.errors import TunesmithError
from tunesmith.files import atomic_path, write_text_atomic

FORMAT = "tunesmith-checkpoint"
VERSION = 1
LAST = "last_checkpoint"
_ITER = re.compile(r"^iter_(\d+)\.pth$")
_EPOCH = re.compile(r"^epoch_(\d+)\.pth$")


# ----------------------------------------------------------------------------------------- optimizer
def flatten_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state_dict -> (tensors for safetensors, a JSON-able rest of plain numbers and strings).

    Tensors may sit at any depth of a parameter's state (bitsandbytes' 8-bit and paged optimizers nest their
    quantization state in a dict): each is stored as ``state.<param index>.<key>.<key>...``."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}

    def split(prefix: str, entry: dict[str, Any]) -> dict[str, Any]:
        rest: dict[str, Any] = {}
        for name, value in entry.items():
            if "." in str(name):
                raise ValueError(f"optimizer state key {name!r} contains a dot")
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{name}"] = value.detach().cpu().contiguous()
            elif isinstance(value, dict):
                inner = split(f"{prefix}.{name}", value)
                rest[name] = {"__nested__": inner}
            else:
                rest[name] = _plain(value, f"{prefix}.{name}")
        return rest

    for index, entry in state_dict["state"].items():
        rest = split(f"state.{index}", entry)
        if rest:
            scalars[str(index)] = rest
    groups = [{k: _plain(v, f"param_groups.{k}") for k, v in g.items()} for g in state_dict["param_groups"]]
    return tensors, {"scalars": scalars, "param_groups": groups}


def _plain(value: Any, where: str) -> Any:
    """``value`` as JSON's plain types (tuples become lists); anything else is a bug worth a clear message."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy scalars
        return value.item()
    raise TypeError(f"optimizer state {where} holds a {type(value).__name__}, which a checkpoint cannot store")


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}

    def merge(target: dict[str, Any], scalars: dict[str, Any]) -> None:
        for name, value in scalars.items():
            if isinstance(value, dict) and "__nested__" in value:
                merge(target.setdefault(name, {}), value["__nested__"])
            else:
                target[name] = value

    for key, value in tensors.items():
        _, index, path = key.split(".", 2)
        target = state.setdefault(int(index), {})
        *parents, name = path.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[name] = value
    for index, entry in rest["scalars"].items():
        merge(state.setdefault(int(index), {}), entry)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states as JSON-able lists."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        cuda = [torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# ----------------------------------------------------------------------------------------- save / load
def save_checkpoint(
    path: Path,
    *,
    meta: dict[str, Any],
    config_yaml: str,
    weights: dict[str, torch.Tensor],
    weights_file: str,
    adapter_config: dict[str, Any] | None,
    optimizer_tensors: list[dict[str, torch.Tensor]],
    trainer_state: dict[str, Any],
) -> Path:
    """Write one checkpoint folder atomically. `optimizer_tensors` holds one dict per rank (one for
    replicated optimizers: single process, DDP) -- more than one only for sharded ZeRO states."""
    path = Path(path)
    with atomic_path(path, is_dir=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / weights_file))
        if adapter_config is not None:
            (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True),
                                                     encoding="utf-8")
        if len(optimizer_tensors) == 1:
            save_file(optimizer_tensors[0], str(tmp / "optimizer.safetensors"))
        else:
            for rank, tensors in enumerate(optimizer_tensors):
                save_file(tensors, str(tmp / f"optimizer.rank{rank}.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state), encoding="utf-8")
        (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
        # meta.json last: a folder with meta.json is complete even if someone copies it half-way
        (tmp / "meta.json").write_text(json.dumps({"format": FORMAT, "version": VERSION, **meta}, indent=2),
                                       encoding="utf-8")
        if os.environ.get("TUNESMITH_TEST_SAVE_DELAY"):  # the kill-and-resume bench widens the window it aims at
            time.sleep(float(os.environ["TUNESMITH_TEST_SAVE_DELAY"]))
    return path


def read_meta(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise TunesmithError(f"checkpoint {path} does not exist or is not a folder",
                             "pass a work_dir/epoch_N.pth or iter_N.pth folder, or --resume auto")
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TunesmithError(f"checkpoint {path} has no readable meta.json",
                             "it is not a tunesmith checkpoint (or an incomplete copy of one)") from exc
    if meta.get("format") != FORMAT:
        raise TunesmithError(f"{path}/meta.json is not a tunesmith checkpoint (format {meta.get('format')!r})")
    if int(meta.get("version", 0)) > VERSION:
        raise TunesmithError(f"checkpoint {path} has format version {meta['version']}, newer than this tunesmith",
                             "upgrade tunesmith")
    return meta


def _files_of(path: Path, rank: int) -> tuple[Path, Path]:
    weights = path / "adapter_model.safetensors"
    if not weights.exists():
        weights = path / "model.safetensors"
    opt_file = path / "optimizer.safetensors"
    if not opt_file.exists():
        opt_file = path / f"optimizer.rank{rank}.safetensors"
    return weights, opt_file


def checkpoint_problem(path: Path, *, rank: int = 0) -> str | None:
    """Why the checkpoint folder ``path`` cannot be resumed from (cut short, damaged, another format), or None.
    Reads the small files whole and the safetensors headers only."""
    from safetensors import safe_open

    try:
        read_meta(path)
    except TunesmithError as exc:
        return str(exc)
    try:
        json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"its trainer_state.json is unreadable ({type(exc).__name__})"
    for file in _files_of(path, rank):
        if not file.exists():
            return f"{file.name} is missing"
        try:
            with safe_open(str(file), framework="pt") as fh:
                list(fh.keys())
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
            return f"{file.name} is damaged ({type(exc).__name__})"
    return None


def load_checkpoint(path: Path, *, rank: int = 0) -> dict[str, Any]:
    """Everything of a checkpoint folder, as plain objects: meta, weights, optimizer (tensors + rest), state."""
    path = Path(path)
    meta = read_meta(path)
    problem = checkpoint_problem(path, rank=rank)
    if problem is not None:
        hint = ("resume with the same number of processes the checkpoint was written with"
                if "optimizer.rank" in problem else "resume from an earlier checkpoint, or --resume auto")
        raise TunesmithError(f"checkpoint {path} cannot be resumed from: {problem}", hint)
    weights_file, opt_file = _files_of(path, rank)
    return {
        "meta": meta,
        "weights": load_file(str(weights_file)),
        "weights_file": weights_file.name,
        "optimizer_tensors": load_file(str(opt_file)),
        "trainer_state": json.loads((path / "trainer_state.json").read_text(encoding="utf-8")),
    }


# What a resumed run may change (XTuner lets a run be resumed with any config): how long it runs (the schedule is
# recomputed for the new length), how it saves, and settings that leave its arithmetic alone (fast paths,
# checkpointing, data loading). Any other difference makes it another run.
RESUMABLE_CHANGES = ("training.max_steps", "training.max_epochs", "training.save_steps", "training.save_total_limit",
                     "training.save_epochs", "training.log_interval", "training.gradient_checkpointing",
                     "training.deterministic", "data.num_workers", "data.cache_dir", "data.strict", "speed")


def check_resumable(meta: dict[str, Any], path: Path, cfg: Any, expected_hash: str,
                    say: Callable[[str], None]) -> None:
    """Refuse to resume `path` with a config that would make another run, naming the keys that differ; say
    which resumable settings changed."""
    import yaml

    from tunesmith.config.load import run_settings

    if meta.get("config_hash") == expected_hash:
        return
    hint = "resume with the config saved in that checkpoint (its config.yaml), or start a new --work-dir"
    try:
        saved = run_settings(yaml.safe_load((Path(path) / "config.yaml").read_text(encoding="utf-8")) or {})
    except (OSError, yaml.YAMLError):
        saved = None
    if saved is None:
        raise TunesmithError(f"checkpoint {path} was written by a different config (hash {meta.get('config_hash')}, "
                             f"this config {expected_hash})", hint)
    ours = run_settings(cfg)
    differ = sorted(k for k in saved.keys() | ours.keys() if saved.get(k) != ours.get(k))
    blocking = [k for k in differ if not any(k == r or k.startswith(r + ".") for r in RESUMABLE_CHANGES)]
    shown = lambda keys: ", ".join(f"{k} {saved.get(k)!r} -> {ours.get(k)!r}" for k in keys)  # noqa: E731
    if blocking:
        raise TunesmithError(f"checkpoint {path} was written by a different config ({shown(blocking[:3])}"
                             f"{', ...' if len(blocking) > 3 else ''})", hint)
    if differ:
        say(f"resuming with changed settings: {shown(differ)}")


# ----------------------------------------------------------------------------------------- bookkeeping
def write_last_checkpoint(work_dir: Path, path: Path) -> None:
    write_text_atomic(Path(work_dir) / LAST, str(Path(path).resolve()) + "\n")


def find_last_checkpoint(work_dir: Path, *, warn: Callable[[str], None] | None = None) -> Path | None:
    """The newest checkpoint of ``work_dir`` that can be resumed from: the one `last_checkpoint` names, else the
    newest complete folder by step. A damaged one is skipped with a one-line ``warn`` and the one before it used."""
    work_dir = Path(work_dir)
    candidates: list[tuple[int, int, Path]] = []
    marker = work_dir / LAST
    if marker.exists():
        named = Path(marker.read_text(encoding="utf-8").strip())
        candidates.append((1, 0, named if named.is_absolute() else work_dir / named))
    for p in work_dir.glob("*.pth"):
        try:
            candidates.append((0, int(json.loads((p / "meta.json").read_text())["step"]), p))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    seen = set()
    for _, _, path in sorted(candidates, key=lambda c: (c[0], c[1]), reverse=True):
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        problem = checkpoint_problem(path) if path.is_dir() else "it does not exist"
        if problem is None:
            return path
        if warn is not None:
            warn(f"warning: skipping checkpoint {path}: {problem}")
    return None


def rotate_iter_checkpoints(work_dir: Path, keep: int | None) -> list[Path]:
    """Delete all but the newest `keep` iter_N.pth folders (epoch_N.pth are never deleted)."""
    if keep is None:
        return []
    found = sorted((int(m.group(1)), p) for p in Path(work_dir).iterdir() if (m := _ITER.match(p.name)))
    removed = []
    for _, p in found[: max(0, len(found) - keep)]:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def remove_stale_temporaries(work_dir: Path) -> None:
    """Folders a killed save left behind (`.iter_N.pth.tmp-*`)."""
    for p in Path(work_dir).glob(".*.pth.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in Path(work_dir).glob(".*.pth.old-*"):
        shutil.rmtree(p, ignore_errors=True)
