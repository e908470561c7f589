"""A tokenizer as GGUF metadata (llama.cpp's `tokenizer.*` keys): the tokenizer tunesmith trained and chats with.

Two kinds of vocabulary:
- byte-level BPE (GPT-2 style: SmolLM2, Llama 3, Qwen): `tokenizer.ggml.model` "gpt2"; the tokens in id order as
  tokenizer.json spells them, their types (CONTROL for special added tokens, USER_DEFINED for other added tokens),
  the merges, and `tokenizer.ggml.pre`, llama.cpp's name for how text is split before BPE. That name is read
  off tokenizer.json's pre-tokenizer: ByteLevel alone is "gpt2", individual digits + ByteLevel "smollm", a
  Split with Llama 3's or Qwen2's pattern "llama-bpe" / "qwen2". Any other split is refused: llama.cpp would
  cut the text differently and the model would see ids it was not trained on.
- sentencepiece (Llama 2, Mistral, InternLM): model "llama"; pieces, scores and piece types straight from
  tokenizer.model (sentencepiece's piece types are numbered as GGUF's token types), then the added tokens.

Both carry the bos / eos / unk / pad ids, add_bos / add_eos as encoding really does it (a probe text is encoded),
the chat template, and an end-of-turn id when the prompt template ends turns with a token other than EOS. The
list is padded to the model's vocab_size with unused `[PAD<id>]` tokens, as llama.cpp's converter pads it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.errors import TunesmithError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # GGUF token types (= sentencepiece's)
ADDED_SCORE = -1000.0  # llama.cpp's score for tokens added on top of a sentencepiece model

# pre-tokenizer split patterns llama.cpp knows by name (tokenizer.json's Split regex -> tokenizer.ggml.pre)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_NAMES = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


@dataclass
class Vocab:
    model: str  # "gpt2" (byte-level BPE) or "llama" (sentencepiece)
    tokens: list[str]
    types: list[int]
    pre: str | None = None
    merges: list[str] | None = None
    scores: list[float] | None = None
    special: dict[str, int] = field(default_factory=dict)  # bos / eos / unk / pad / eot -> id
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None

    def write(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
                  "pad": writer.add_pad_token_id, "eot": writer.add_eot_token_id}
        for key, token_id in self.special.items():
            adders[key](token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _adds(tokenizer: Any, token_id: int | None, where: int) -> bool:
    """Whether encoding with special tokens puts `token_id` first (where=0) or last (where=-1)."""
    if token_id is None:
        return False
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(full) > len(plain) and full[where] == token_id and (not plain or plain[where] != token_id)


def _chat_template(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template or None


def _describe(pre: dict | None) -> str:
    if not pre:
        return "none"
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return " + ".join(str(s.get("type")) for s in steps)


def pre_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a tokenizer.json pre-tokenizer, None when it has none for it."""
    if not pre:
        return None
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = steps[0].get("pattern") or {}
        if steps[0].get("behavior") in (None, "Isolated") and not steps[0].get("invert"):
            return SPLIT_NAMES.get(pattern.get("Regex"))
    return None


def _pad(tokens: list[str | None], types: list[int], size: int) -> None:
    """Fill holes and extend to `size` with unused [PAD<id>] tokens."""
    tokens.extend([None] * (size - len(tokens)))
    types.extend([UNUSED] * (size - len(types)))
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i] = f"[PAD{i}]"
            types[i] = UNUSED


def _byte_level(data: dict, size: int) -> Vocab | None:
    model = data.get("model") or {}
    pre = data.get("pre_tokenizer")
    byte_level = "ByteLevel" in _describe(pre) or (data.get("decoder") or {}).get("type") == "ByteLevel"
    if model.get("type") != "BPE" or not byte_level:
        return None
    name = pre_name(pre)
    if name is None:
        raise TunesmithError(
            f"the tokenizer's pre-tokenizer ({_describe(pre)}) is not one convert gguf can name for llama.cpp "
            "(it knows gpt2, smollm, llama-bpe and qwen2): llama.cpp would split text differently",
            "convert the model with llama.cpp's convert_hf_to_gguf.py, which recognises more tokenizers",
        )
    tokens: list[str | None] = [None] * size
    types = [NORMAL] * size
    for token, token_id in model["vocab"].items():
        if token_id < size:
            tokens[token_id] = token
    for added in data.get("added_tokens", []):
        if added["id"] < size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    _pad(tokens, types, size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre_steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    space = next((s.get("add_prefix_space") for s in pre_steps if s.get("type") == "ByteLevel"), None)
    return Vocab("gpt2", tokens, types, pre=name, merges=merges,
                 add_space_prefix=bool(space) if space is not None else None)


def _read_proto(path: Path):
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        raise TunesmithError(f"{path} is a sentencepiece model; reading it needs sentencepiece and protobuf",
                             "pip install sentencepiece protobuf") from None
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return proto


def _sentencepiece(tokenizer: Any, model_file: Path, size: int) -> Vocab:
    proto = _read_proto(model_file)
    tokens: list[str | None] = [p.piece for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i, t in enumerate(types):  # pieces the tokenizer treats as special (<|im_end|> ...) end turns: control
        if t == USER_DEFINED and i in special_ids:
            types[i] = CONTROL
    for token_id, added in sorted(tokenizer.added_tokens_decoder.items()):
        if token_id < len(tokens) or token_id >= size:
            continue
        while len(tokens) < token_id:  # a hole before it
            tokens.append(None)
            scores.append(ADDED_SCORE)
            types.append(UNUSED)
        tokens.append(added.content)
        scores.append(ADDED_SCORE)
        types.append(CONTROL if added.special else USER_DEFINED)
    scores.extend([ADDED_SCORE] * (size - len(scores)))
    _pad(tokens, types, size)
    return Vocab("llama", tokens, types, scores=scores,
                 add_space_prefix=bool(proto.normalizer_spec.add_dummy_prefix))


def _same_pieces(tokenizer: Any, model_file: Path) -> bool:
    """Whether `model_file` is the sentencepiece model `tokenizer` was made from (same pieces at the same ids)."""
    pieces = [p.piece for p in _read_proto(model_file).pieces]
    return tokenizer.convert_ids_to_tokens(list(range(len(pieces)))) == pieces


def read_vocab(tokenizer: Any, folders: list[Path], vocab_size: int, *, end_of_turn: str | None = None) -> Vocab:
    """The GGUF vocabulary of `tokenizer` for a model of `vocab_size` rows. `folders`: where the tokenizer came
    from, then the base model (an adapter folder re-saves the base's sentencepiece tokenizer as tokenizer.json
    only: the base's tokenizer.model is used when its pieces are the tokenizer's). `end_of_turn`: the text that
    ends a reply in the prompt template (written as the eot id when it is one token)."""
    if len(tokenizer) > vocab_size:
        raise TunesmithError(
            f"the tokenizer has {len(tokenizer)} tokens, the model's embedding only {vocab_size} rows",
            "the tokenizer does not belong to this model (or tokens were added without resizing the embeddings)",
        )
    backend = getattr(tokenizer, "backend_tokenizer", None)
    data = json.loads(backend.to_str()) if backend is not None else {}
    vocab = _byte_level(data, vocab_size) if data else None
    if vocab is None:
        files = [Path(f) / "tokenizer.model" for f in folders if (Path(f) / "tokenizer.model").is_file()]
        model_file = next((f for f in files if _same_pieces(tokenizer, f)), None)
        if model_file is None:
            kind = (data.get("model") or {}).get("type", type(tokenizer).__name__)
            raise TunesmithError(
                f"the tokenizer of {folders[0]} ({kind}) is neither byte-level BPE nor backed by a sentencepiece "
                "tokenizer.model, and cannot be written as a GGUF vocabulary here",
                "convert the model with llama.cpp's convert_hf_to_gguf.py",
            )
        vocab = _sentencepiece(tokenizer, model_file, vocab_size)
    for key in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{key}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < vocab_size:
            vocab.special[key] = token_id
    if end_of_turn:
        ids = tokenizer(end_of_turn, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and ids[0] != vocab.special.get("eos"):
            vocab.special["eot"] = ids[0]
    vocab.add_bos = _adds(tokenizer, tokenizer.bos_token_id, 0)
    vocab.add_eos = _adds(tokenizer, tokenizer.eos_token_id, -1)
    vocab.chat_template = _chat_template(tokenizer)
    return vocab
