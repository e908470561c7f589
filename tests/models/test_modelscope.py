"""Model hub ids on ModelScope (XTuner's tutorial downloads Shanghai_AI_Laboratory/internlm-chat-7b from there):
tried after Hugging Face when the `modelscope` package is installed, as data.path hub ids are. No network here:
both hubs' ``snapshot_download`` are stand-ins."""

from __future__ import annotations

import sys
import types

import huggingface_hub
import pytest

from tunesmith.errors import TunesmithError
from tunesmith.models import load_model, resolve_model_path

MS_ID = "Shanghai_AI_Laboratory/internlm-chat-7b"
DOWNLOAD = f"modelscope download --model {MS_ID} --local_dir ./internlm-chat-7b"


@pytest.fixture
def hf_fails(monkeypatch):
    """Hugging Face answers like the hub does for a repo it does not have (or like any network failure)."""
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append(kwargs.get("local_files_only", False))
        raise OSError(f"{repo_id} is not a valid model identifier listed on 'https://huggingface.co/models'")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def _fake_modelscope(monkeypatch, snapshot_download) -> None:
    module = types.ModuleType("modelscope")
    module.snapshot_download = snapshot_download
    monkeypatch.setitem(sys.modules, "modelscope", module)


def test_without_the_modelscope_package(monkeypatch, hf_fails):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # `import modelscope` raises ImportError
    with pytest.raises(TunesmithError) as err:
        resolve_model_path(MS_ID)
    message, hint = err.value.message, err.value.hint
    assert MS_ID in message and "Hugging Face hub (" in message and "not a valid model identifier" in message
    assert "modelscope package is not installed" in message
    assert "pip install modelscope" in hint and DOWNLOAD in hint and "pass ./internlm-chat-7b" in hint
    assert "\n" not in str(err.value)
    assert hf_fails == [True, False]  # Hugging Face: its cache, then online


def test_modelscope_offline(monkeypatch, hf_fails):
    def snapshot_download(model_id, **kwargs):
        raise ConnectionError("HTTPSConnectionPool(host='www.modelscope.cn', port=443): Max retries exceeded\nmore")

    _fake_modelscope(monkeypatch, snapshot_download)
    with pytest.raises(TunesmithError) as err:
        resolve_model_path(MS_ID)
    message, hint = err.value.message, err.value.hint
    assert "or from ModelScope (HTTPSConnectionPool(host='www.modelscope.cn'" in message
    assert "more" not in message and "\n" not in str(err.value)  # first line of each failure only
    assert "offline" in hint and DOWNLOAD in hint and "pip install" not in hint


@pytest.mark.parametrize("cached", [False, True])
def test_model_from_modelscope(monkeypatch, hf_fails, tiny_llama, cached):
    calls = []

    def snapshot_download(model_id, *, allow_patterns, local_files_only=False):
        calls.append((model_id, local_files_only))
        assert "*.safetensors" in allow_patterns and "*.json" in allow_patterns
        if local_files_only and not cached:
            raise FileNotFoundError(f"{model_id} is not in the ModelScope cache")
        return str(tiny_llama)

    _fake_modelscope(monkeypatch, snapshot_download)
    assert resolve_model_path(MS_ID) == tiny_llama
    assert calls == ([(MS_ID, True)] if cached else [(MS_ID, True), (MS_ID, False)])
    calls.clear()
    model = load_model(MS_ID, dtype="fp32")  # the same way every command that takes a model path resolves it
    assert model.config.model_type == "llama"


def test_bin_only_repo_fetches_the_bin_weights(monkeypatch, hf_fails, tiny_llama, tmp_path):
    """internlm-chat-7b ships pytorch_model-*.bin only: a second call asks for those."""
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text((tiny_llama / "config.json").read_text())
    asked = []

    def snapshot_download(model_id, *, allow_patterns, local_files_only=False):
        asked.append(list(allow_patterns))
        if local_files_only:
            raise FileNotFoundError("not cached")
        return str(tiny_llama if "*.bin" in allow_patterns else config_only)

    _fake_modelscope(monkeypatch, snapshot_download)
    assert resolve_model_path(MS_ID) == tiny_llama
    assert ["*.bin" in patterns for patterns in asked] == [False, False, True]
