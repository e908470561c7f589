"""Every fixture family loads through load_model + load_tokenizer; the fixtures themselves are deterministic."""

from __future__ import annotations

import hashlib

import pytest
import torch

from tunesmith.models import auto_dtype, load_model, load_tokenizer, pick_dtype, resolve_model_path

FAMILIES = ["tiny_llama", "tiny_qwen2", "tiny_internlm", "tiny_internlm2", "tiny_internlm_bin"]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_loads_and_runs(family, request):
    folder = request.getfixturevalue(family)
    assert resolve_model_path(str(folder)) == folder
    tok = load_tokenizer(folder)
    model = load_model(folder)
    assert model.dtype == auto_dtype()  # fp32 on CPU-only machines
    assert tok.pad_token is not None and tok.padding_side == "right"
    batch = tok(["Hello world", "Please tell me five scenic spots in Shanghai"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], model.config.vocab_size)
    assert len(tok) <= model.config.vocab_size
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("family", "rendered"),
    [
        ("tiny_llama", "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"),
        ("tiny_qwen2", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"),
        ("tiny_internlm", "<s><|User|>:hi<eoh>\n<|Bot|>:"),
    ],
)
def test_chat_templates_render(family, rendered, request):
    tok = load_tokenizer(request.getfixturevalue(family))
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == rendered


def test_special_tokens_of_the_bpe_fixtures(tiny_llama, tiny_qwen2):
    llama = load_tokenizer(tiny_llama)
    assert (llama.bos_token, llama.eos_token, llama.pad_token, llama.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert llama("hi").input_ids[0] == llama.bos_token_id
    qwen = load_tokenizer(tiny_qwen2)
    assert qwen.bos_token is None and qwen.eos_token == "<|im_end|>" and qwen.pad_token == "<|endoftext|>"
    for tok in (llama, qwen):
        ids = tok("a<|im_start|>b<|im_end|>", add_special_tokens=False).input_ids
        assert tok.convert_tokens_to_ids("<|im_start|>") in ids and tok.convert_tokens_to_ids("<|im_end|>") in ids


def test_missing_pad_token_falls_back_to_unk_then_eos(tiny_llama, tmp_path):
    import shutil

    folder = tmp_path / "llama"
    shutil.copytree(tiny_llama, folder)
    tok = load_tokenizer(folder)
    tok.pad_token = None
    tok.save_pretrained(folder)
    assert load_tokenizer(folder).pad_token == "<unk>"
    tok.unk_token = None
    tok.save_pretrained(folder)
    assert load_tokenizer(folder).pad_token == "</s>"


def test_dtype_choice():
    if not torch.cuda.is_available():
        assert auto_dtype() is torch.float32
    assert pick_dtype("auto") == auto_dtype()
    assert pick_dtype("bf16") is torch.bfloat16 and pick_dtype("float16") is torch.float16
    assert pick_dtype(torch.float32) is torch.float32


def test_explicit_dtype_and_attention(tiny_llama):
    model = load_model(tiny_llama, dtype="bf16", attn_implementation="eager")
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"


def _digest(folder, names):
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names}


def test_fixtures_are_deterministic(tmp_path):
    from tests.fixtures.tiny_models import make_tiny_internlm, make_tiny_qwen2

    names = ["model.safetensors", "tokenizer.model", "config.json"]
    assert _digest(make_tiny_internlm(tmp_path / "a"), names) == _digest(make_tiny_internlm(tmp_path / "b"), names)
    names = ["model.safetensors", "tokenizer.json"]
    assert _digest(make_tiny_qwen2(tmp_path / "c"), names) == _digest(make_tiny_qwen2(tmp_path / "d"), names)
