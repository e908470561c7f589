"""Loading for chat: a LoRA adapter on top of a base (merged or not), 4-bit, bad adapters."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tunesmith.errors import TunesmithError
from tunesmith.infer.api import Chat, load_for_chat


def _adapter(base_path, out_dir):
    from peft import LoraConfig, get_peft_model

    model, _ = load_for_chat(str(base_path))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(out_dir)
    return peft_model


def test_adapter_is_applied(tiny_qwen2, tmp_path):
    peft_model = _adapter(tiny_qwen2, tmp_path / "adapter")
    merged, tok = load_for_chat(str(tiny_qwen2), adapter=str(tmp_path / "adapter"))
    base, _ = load_for_chat(str(tiny_qwen2))
    ids = torch.tensor([tok("hello world", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        assert torch.allclose(merged(input_ids=ids).logits, want, atol=1e-4)
        assert not torch.allclose(base(input_ids=ids).logits, want, atol=1e-4)


def test_bad_adapter_folder(tiny_qwen2, tmp_path):
    with pytest.raises(TunesmithError, match="adapter_config.json"):
        load_for_chat(str(tiny_qwen2), adapter=str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_4bit_chat_runs(tiny_llama):
    chat = Chat(str(tiny_llama), bits=4, prompt_template="auto", temperature=0, max_new_tokens=4)
    assert chat.generator.mode == "plain"
    chat.ask("hello")
    assert len(chat.last_result.ids) >= 1


def test_python_api_two_turns_and_reset(tiny_llama):
    chat = Chat(str(tiny_llama), prompt_template="auto", temperature=0, max_new_tokens=5)
    a = chat.ask("hello")
    chat.ask("again")
    assert len(chat.session.turns) == 2
    chat.reset()
    assert chat.session.turns == [] and chat.ask("hello") == a  # same prompt, same greedy answer
