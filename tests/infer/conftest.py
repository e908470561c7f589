"""Fixtures for tests/infer: SmolLM2's real byte-level BPE tokenizer (from the suite's `smollm2_path`) and a
tiny random Llama built from a config around it (its vocabulary is real, so decoded text is real text)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def smol_tokenizer(smollm2_path):
    from tunesmith.models import load_tokenizer

    return load_tokenizer(smollm2_path)


def build_tiny_llama(tokenizer, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=overrides.pop("max_positions", 512),
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, **overrides,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_model(smol_tokenizer):
    return build_tiny_llama(smol_tokenizer)
