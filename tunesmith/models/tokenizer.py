"""Tokenizer loading: one call for every model folder, InternLM's sentencepiece ones included.

Conventions every later stage relies on:
- padding_side is "right" (training; generation code pads left itself where it batches);
- a pad token always exists. When the tokenizer has none we reuse `unk` if it has one (it never occurs in
  real text, so padding can never be mistaken for the end-of-turn token the model must learn), else `eos`
  (Llama-3 / Qwen style vocabularies have no unk). Padded positions are masked by attention_mask and
  labels (-100), so the pad id itself never reaches the loss.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.models.internlm import INTERNLM_MODEL_TYPES, INTERNLM_TOKENIZER_CLASSES


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _is_internlm_tokenizer(folder: Path) -> bool:
    cls = _read_json(folder / "tokenizer_config.json").get("tokenizer_class")
    model_type = _read_json(folder / "config.json").get("model_type")
    if (folder / "tokenizer.json").is_file() and cls not in INTERNLM_TOKENIZER_CLASSES:
        return False  # already converted (e.g. by convert_internlm_folder)
    return (folder / "tokenizer.model").is_file() and (
        cls in INTERNLM_TOKENIZER_CLASSES or model_type in INTERNLM_MODEL_TYPES
    )


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """The tokenizer of a model folder, a tokenizer-only folder (``model.tokenizer_path``), or any name
    resolve_model_path accepts; pad token set, right padding."""
    from tunesmith.models.resolve import resolve_model_path

    local = Path(path).expanduser()
    tokenizer_only = local.is_dir() and any((local / name).is_file() for name in _TOKENIZER_FILES)
    folder = local if tokenizer_only else resolve_model_path(path)
    if _is_internlm_tokenizer(folder):
        tokenizer = _sentencepiece_as_llama(folder)
    else:
        tokenizer = _auto_tokenizer(folder, trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "qwen.tiktoken")


def _auto_tokenizer(folder: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise TunesmithError(
            f"{folder} has no tokenizer files (looked for {', '.join(_TOKENIZER_FILES[:3])})",
            "copy the tokenizer files from the base model into it, or set model.tokenizer_path",
        )
    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (ValueError, OSError) as exc:
        message = str(exc)
        if "trust_remote_code" in message:
            raise TunesmithError(
                f"the tokenizer of {folder} needs its own Python code (remote code)",
                "pass --trust-remote-code (model.trust_remote_code: true) if you trust the code in that folder",
            ) from None
        raise TunesmithError(
            f"cannot load the tokenizer of {folder}: {message.strip().splitlines()[0][:200]}",
            "the folder needs tokenizer.json or tokenizer.model with tokenizer_config.json",
        ) from None


def _sentencepiece_as_llama(folder: Path):
    """InternLM / InternLM2 tokenizer.model as transformers' LlamaTokenizer (fast, tokenizers-backed)."""
    from tokenizers import AddedToken
    from transformers import LlamaTokenizer

    proto = _sentencepiece_proto(folder / "tokenizer.model")
    # the sentencepiece model decides whether a space is prepended, not the class default
    tokenizer = LlamaTokenizer.from_pretrained(
        str(folder), add_prefix_space=proto.normalizer_spec.add_dummy_prefix, legacy=False
    )
    # user-defined pieces (<eoh>, <eoa>, <|im_start|> ...) are atomic in sentencepiece; BPE merges alone
    # cannot produce them, so they become added tokens at their own ids (special only if declared so)
    user_defined = 4
    missing = [
        p.piece for p in proto.pieces if p.type == user_defined and p.piece not in tokenizer.get_added_vocab()
    ]
    if missing:
        tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in missing])
    # saved copies must not point at the remote tokenizer code this class replaces
    tokenizer.init_kwargs.pop("auto_map", None)
    return tokenizer


def _sentencepiece_proto(path: Path):
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        raise TunesmithError(
            f"{path} is a sentencepiece model; reading it needs sentencepiece and protobuf",
            "pip install sentencepiece protobuf",
        ) from None
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return proto
