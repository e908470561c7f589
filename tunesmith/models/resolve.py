"""Turn what a user typed as a model (folder, .gguf file, builtin: name, hub id) into a local HF folder.

A hub id (``owner/name``) is looked up on Hugging Face, then on ModelScope when the `modelscope` package is
installed (as ``data.path`` hub ids are); a copy either hub has cached is used without going online.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from tunesmith.errors import TunesmithError

BUILTIN_PREFIX = "builtin:"
# in the order transformers prefers them: safetensors first, never a pickle when safetensors exist
_WEIGHT_NAMES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint files of an HF folder (all shards), safetensors preferred; [] when there are none."""
    for name in _WEIGHT_NAMES:
        candidate = folder / name
        if not candidate.is_file():
            continue
        if name.endswith(".index.json"):
            index = json.loads(candidate.read_text(encoding="utf-8"))
            shards = sorted(set(index.get("weight_map", {}).values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise TunesmithError(
                    f"{candidate} names shards that are missing: {', '.join(missing[:3])}",
                    "download or copy the complete model folder again",
                )
            return [folder / s for s in shards]
        return [candidate]
    # an unusual single-file name (e.g. consolidated.safetensors) without an index
    loose = sorted(folder.glob("*.safetensors"))
    return loose if len(loose) == 1 else []


def read_config(folder: Path) -> dict:
    """config.json of an HF folder as a dict (no remote code involved)."""
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TunesmithError(
            f"{folder} has no config.json", "pass a Hugging Face model folder (config.json + weights)"
        ) from None
    except json.JSONDecodeError as exc:
        raise TunesmithError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}", "fix or re-download it") from None


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A local HF model folder for `name_or_path`; GGUF files and builtin: models are materialised once, hub ids
    (Hugging Face, or ModelScope with the `modelscope` package) downloaded once into that hub's cache."""
    text = str(name_or_path)
    if text.startswith(BUILTIN_PREFIX):
        from tunesmith.models.builtin import materialise_builtin

        return materialise_builtin(text[len(BUILTIN_PREFIX) :])
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        from tunesmith.models.gguf import materialise_gguf

        return materialise_gguf(path)
    if path.is_dir():
        return _check_folder(path)
    if path.exists():
        raise TunesmithError(
            f"model path {text} is a file, not a model folder",
            "pass the folder holding config.json and the weights (or a .gguf file)",
        )
    if _HUB_ID.match(text) and not text.startswith("."):
        return _from_hub(text)
    raise TunesmithError(f"model path {text} does not exist",
                         "pass a local model folder, a .gguf file, a hub id (Hugging Face or ModelScope) or "
                         "builtin:smollm2-135m-instruct "
                         "(in a training config: model.path)")


def _check_folder(folder: Path) -> Path:
    if weight_files(folder) and (folder / "config.json").is_file():
        return folder
    if (folder / "adapter_config.json").is_file():
        raise TunesmithError(
            f"{folder} is a LoRA adapter, not a model",
            "pass the base model as the model and this folder as --adapter",
        )
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1 and not (folder / "config.json").is_file():
        from tunesmith.models.gguf import materialise_gguf

        return materialise_gguf(ggufs[0])
    found = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    listing = ", ".join(found[:12]) + (" ..." if len(found) > 12 else "") if found else "nothing"
    what = "no config.json" if weight_files(folder) else "no model weights"
    raise TunesmithError(
        f"model folder {folder} has {what} (found: {listing})",
        "it needs config.json plus model.safetensors (or sharded *.safetensors with an index, or pytorch_model.bin)",
    )


# what a model folder needs from a hub repo (.bin weights are fetched only for repos without safetensors)
_HUB_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja", "*.py")


def _snapshot(download, repo_id: str) -> Path:
    """``repo_id`` through one hub's ``snapshot_download`` (huggingface_hub's or modelscope's: the same arguments):
    the cached copy when it holds weights, else a download."""
    patterns = list(_HUB_PATTERNS)
    try:
        folder = Path(download(repo_id, allow_patterns=patterns, local_files_only=True))
        if weight_files(folder):
            return folder
    except Exception:  # noqa: BLE001 - not cached yet: go online below
        pass
    folder = Path(download(repo_id, allow_patterns=patterns))
    if not weight_files(folder):  # an old repo with .bin weights only (internlm-chat-7b)
        folder = Path(download(repo_id, allow_patterns=[*patterns, "*.bin"]))
    return folder


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


def _from_hub(repo_id: str) -> Path:
    """A hub model: Hugging Face first, then ModelScope when the `modelscope` package is installed (as data.path
    hub ids: tunesmith/data/sources.py)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a transformers dependency
        raise TunesmithError(f"model path {repo_id} does not exist", "check the path") from None
    try:
        folder = _snapshot(snapshot_download, repo_id)
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo (a ModelScope id), gated repo ...
        folder = _from_modelscope(repo_id, hf_error=_first_line(exc))
    return _check_folder(folder)


def _from_modelscope(repo_id: str, *, hf_error: str) -> Path:
    """``repo_id`` from ModelScope (e.g. Shanghai_AI_Laboratory/internlm-chat-7b, as XTuner's tutorial downloads
    it); a TunesmithError naming both hubs' failures when that does not work either."""
    local = f"./{repo_id.rsplit('/', 1)[-1]}"
    download_once = (f"download it once (`modelscope download --model {repo_id} --local_dir {local}`, or "
                     f"`hf download {repo_id} --local-dir {local}`) and pass {local} as the model")
    what = (f"model path {repo_id} does not exist locally and could not be fetched from the Hugging Face hub "
            f"({hf_error})")
    try:
        from modelscope import snapshot_download  # type: ignore[import-not-found]
    except ImportError:
        raise TunesmithError(
            f"{what}; ModelScope was not tried: the modelscope package is not installed",
            f"check the path; for a ModelScope model pip install modelscope (or 'tunesmith[modelscope]'), or "
            f"{download_once}; for a gated Hugging Face model run `hf auth login`",
        ) from None
    try:
        return _snapshot(snapshot_download, repo_id)
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo ...
        raise TunesmithError(
            f"{what} or from ModelScope ({_first_line(exc)})",
            f"check the path; offline, {download_once}; for a gated Hugging Face model run `hf auth login`",
        ) from None
