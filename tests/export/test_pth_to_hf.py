"""convert pth_to_hf: checkpoint folders (docs/internals.md) -> PEFT adapter / complete model folders."""

from __future__ import annotations

import json

import pytest
import torch

from tests.export.helpers import (
    IDS,
    model_logits,
    read_json,
    train_config,
    write_checkpoint,
    write_config,
)
from tunesmith.errors import TunesmithError
from tunesmith.export.pth_to_hf import pth_to_hf
from tunesmith.export.shards import list_tensors


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model(input_ids=IDS).logits.float()


@torch.no_grad()
def _adapter_logits(base, adapter, dtype="fp32") -> torch.Tensor:
    from peft import PeftModel

    from tunesmith.models import load_model

    model = PeftModel.from_pretrained(load_model(base, dtype=dtype), str(adapter))
    return _logits(model.eval())


@pytest.fixture(scope="module")
def lora_ckpt(bases, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_ckpt")
    cfg = train_config(bases["llama"], "lora", template="internlm_chat", data={"system": "Be brief."})
    ckpt, model = write_checkpoint(cfg, root / "work" / "epoch_1.pth")
    return write_config(cfg, root / "my_config.yaml"), ckpt, _logits(model)


def test_lora_checkpoint_to_peft_adapter(bases, lora_ckpt, tmp_path):
    config, ckpt, trained = lora_ckpt
    result = pth_to_hf(config, ckpt, tmp_path / "hf")
    out = tmp_path / "hf"
    assert result.kind == "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "tunesmith_config.yaml",
            "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not list(out.glob("model*.safetensors"))  # no base weights written
    adapter_config = read_json(out / "adapter_config.json")
    assert adapter_config["base_model_name_or_path"] == str(bases["llama"].resolve())
    assert adapter_config["inference_mode"] is True
    assert {r.dtype for r in list_tensors([out / "adapter_model.safetensors"])} == {torch.float16}
    # peft loads it; the fp16 export reproduces the trained model's logits within fp16 rounding of the adapter
    got = _adapter_logits(bases["llama"], out)
    assert (got - trained).abs().max() < 2e-3
    assert (out / "tunesmith_config.yaml").read_text() == (ckpt / "config.yaml").read_text()


def test_fp32_keeps_exact_weights(bases, lora_ckpt, tmp_path):
    config, ckpt, trained = lora_ckpt
    pth_to_hf(config, ckpt, tmp_path / "hf", fp32=True)
    assert {r.dtype for r in list_tensors([tmp_path / "hf" / "adapter_model.safetensors"])} == {torch.float32}
    assert (_adapter_logits(bases["llama"], tmp_path / "hf") - trained).abs().max() < 1e-5


def test_no_safe_serialization_writes_bin(bases, lora_ckpt, tmp_path):
    config, ckpt, trained = lora_ckpt
    pth_to_hf(config, ckpt, tmp_path / "hf", safe_serialization=False, fp32=True)
    assert (tmp_path / "hf" / "adapter_model.bin").is_file()
    assert (_adapter_logits(bases["llama"], tmp_path / "hf") - trained).abs().max() < 1e-5


def test_tokenizer_renders_the_training_template(bases, lora_ckpt, tmp_path):
    from transformers import AutoTokenizer

    from tunesmith.data import Turn
    from tunesmith.data.render import render_prompt_text
    from tunesmith.models import load_tokenizer

    config, ckpt, _ = lora_ckpt
    pth_to_hf(config, ckpt, tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "tell me more"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    expected = render_prompt_text(load_tokenizer(bases["llama"]), "internlm_chat",
                                  [Turn("hello", "hi"), Turn("tell me more", "")], system="Be brief.")
    assert text == expected and "<|User|>:hello" in text and "Be brief." in text


def test_auto_template_keeps_the_tokenizers_own(bases, tmp_path):
    from transformers import AutoTokenizer

    cfg = train_config(bases["qwen2"], "lora", template="auto")
    ckpt, _ = write_checkpoint(cfg, tmp_path / "epoch_1.pth")
    pth_to_hf(write_config(cfg, tmp_path / "c.yaml"), ckpt, tmp_path / "hf")
    ours = AutoTokenizer.from_pretrained(tmp_path / "hf").chat_template
    assert ours == AutoTokenizer.from_pretrained(bases["qwen2"]).chat_template


def test_qlora_checkpoint_never_loads_the_base(bases, tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    cfg = train_config(bases["internlm2"], "qlora", template="internlm2_chat")
    ckpt, model = write_checkpoint(cfg, tmp_path / "epoch_1.pth", meta_extra={"deepspeed": "deepspeed_zero3",
                                                                              "zero_stage": 3})
    config = write_config(cfg, tmp_path / "c.yaml")
    import tunesmith.models as models

    def forbidden(*a, **k):
        raise AssertionError("pth_to_hf must not load model weights for an adapter")

    monkeypatch.setattr(models, "load_model", forbidden)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", forbidden)
    pth_to_hf(config, ckpt, tmp_path / "hf", fp32=True)
    monkeypatch.undo()
    # the QLoRA adapter on the 4-bit base gives (about) the logits of the same adapter on the NF4 model
    from peft import PeftModel

    from tunesmith.models import load_model

    quantized = PeftModel.from_pretrained(load_model(bases["internlm2"], dtype="fp32", bits=4), str(tmp_path / "hf"))
    assert (_logits(quantized.eval()) - _logits(model)).abs().max() < 1e-5


def test_wrong_config_is_refused(bases, lora_ckpt, tmp_path):
    config, ckpt, _ = lora_ckpt
    other = train_config(bases["llama"], "lora", template="internlm_chat", data={"system": "Be brief."},
                         lora={"r": 8}, training={"lr": 1e-5})
    with pytest.raises(TunesmithError, match="another model setup.*lora.r: 4 vs 8") as info:
        pth_to_hf(write_config(other, tmp_path / "other.yaml"), ckpt, tmp_path / "hf")
    assert "config.yaml" in info.value.hint and not (tmp_path / "hf").exists()
    full = train_config(bases["llama"], "full")
    with pytest.raises(TunesmithError, match="method 'lora'.*says 'full'"):
        pth_to_hf(write_config(full, tmp_path / "full.yaml"), ckpt, tmp_path / "hf")
    # overrides reach the config; training-only keys (lr, data path, steps) may differ from the checkpoint's
    pth_to_hf(write_config(other, tmp_path / "other.yaml"), ckpt, tmp_path / "hf", overrides=["lora.r=4"])


def test_not_a_checkpoint(bases, lora_ckpt, tmp_path):
    config, ckpt, _ = lora_ckpt
    with pytest.raises(TunesmithError, match="does not exist"):
        pth_to_hf(config, tmp_path / "nope", tmp_path / "hf")
    pickle = tmp_path / "epoch_1.pth"
    pickle.write_bytes(b"\x80\x04")
    with pytest.raises(TunesmithError, match="is a file"):
        pth_to_hf(config, pickle, tmp_path / "hf")
    with pytest.raises(TunesmithError, match="is a work dir") as info:
        pth_to_hf(config, ckpt.parent, tmp_path / "hf")
    assert "epoch_1.pth" in info.value.hint
    ds = tmp_path / "ds"
    (ds / "global_step10").mkdir(parents=True)
    (ds / "latest").write_text("global_step10")
    with pytest.raises(TunesmithError, match="raw DeepSpeed checkpoint"):
        pth_to_hf(config, ds, tmp_path / "hf")


def test_destination_exists(lora_ckpt, tmp_path):
    config, ckpt, _ = lora_ckpt
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "x").write_text("x")
    with pytest.raises(TunesmithError, match="already exists"):
        pth_to_hf(config, ckpt, tmp_path / "hf")
    pth_to_hf(config, ckpt, tmp_path / "hf", overwrite=True)
    assert not (tmp_path / "hf" / "x").exists()


@pytest.mark.parametrize("kind", ["llama", "internlm2"])
def test_full_finetune_to_model_folder(kind, bases, tmp_path):
    base = bases[kind]
    template = "chatml" if kind == "llama" else "internlm2_chat"
    cfg = train_config(base, "full", template=template)
    ckpt, model = write_checkpoint(cfg, tmp_path / "epoch_1.pth", seed=1)
    result = pth_to_hf(write_config(cfg, tmp_path / "c.yaml"), ckpt, tmp_path / "hf", max_shard_size="100KB",
                       fp32=True)
    out = tmp_path / "hf"
    assert result.kind == "model" and len(result.files) > 1 and (out / "model.safetensors.index.json").is_file()
    assert read_json(out / "config.json")["model_type"] == read_json(base / "config.json")["model_type"]
    if kind == "internlm2":  # written back in the base's own (fused) layout
        names = {r.name for r in list_tensors(sorted(out.glob("model-*.safetensors")))}
        assert "model.layers.0.attention.wqkv.weight" in names and "output.weight" in names
    assert (model_logits(out) - _logits(model)).abs().max() < 1e-5
    # default: fp16
    pth_to_hf(write_config(cfg, tmp_path / "c.yaml"), ckpt, tmp_path / "hf16")
    assert {r.dtype for r in list_tensors([tmp_path / "hf16" / "model.safetensors"])} == {torch.float16}
    assert read_json(tmp_path / "hf16" / "config.json").get("dtype", read_json(
        tmp_path / "hf16" / "config.json").get("torch_dtype")) == "float16"


def test_full_finetune_loads_in_plain_transformers(bases, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = train_config(bases["qwen2"], "full", template="chatml")
    ckpt, model = write_checkpoint(cfg, tmp_path / "epoch_1.pth", seed=2)
    pth_to_hf(write_config(cfg, tmp_path / "c.yaml"), ckpt, tmp_path / "hf", fp32=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert (_logits(loaded) - _logits(model)).abs().max() < 1e-5  # tied head restored
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").chat_template


def test_end_to_end_train_convert_merge(tmp_path, bases):
    """The real training loop writes the checkpoint; pth_to_hf and merge reproduce the trained model."""
    from peft import PeftModel

    from tunesmith.config import load_config
    from tunesmith.export.merge import merge_adapter
    from tunesmith.models import load_model
    from tunesmith.train import train

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"conversation": [{"input": f"question {i}", "output": f"answer {i}"}]})
                            + "\n" for i in range(8)))
    cfg = train_config(bases["llama"], "lora", template="internlm_chat",
                       data={"path": str(data), "max_length": 32, "cache_dir": str(tmp_path / "cache")},
                       training={"max_steps": 2, "batch_size": 2, "accumulative_counts": 1, "lr": 1e-2,
                                 "gradient_checkpointing": False, "save_epochs": True},
                       evaluation={"inputs": []}, logging={"tensorboard": False, "plot": False})
    config = write_config(cfg, tmp_path / "tiny.yaml")
    cfg, _ = load_config(str(config))
    train(cfg, work_dir=tmp_path / "work", progress=False)
    from tunesmith.train.checkpoint import find_last_checkpoint

    ckpt = find_last_checkpoint(tmp_path / "work")
    pth_to_hf(config, ckpt, tmp_path / "hf", fp32=True)
    merge_adapter(bases["llama"], tmp_path / "hf", tmp_path / "merged")
    trained = PeftModel.from_pretrained(load_model(bases["llama"], dtype="fp32"), str(ckpt)).eval()
    reference = _logits(trained)
    assert (reference - model_logits(bases["llama"])).abs().max() > 1e-3  # training changed something
    assert (model_logits(tmp_path / "merged") - reference).abs().max() < 1e-5
    # the merged folder loads in plain transformers and renders the training template
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.data import Turn
    from tunesmith.data.render import render_prompt_text
    from tunesmith.models import load_tokenizer

    assert (_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")) - reference).abs().max() < 1e-5
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    text = tok.apply_chat_template([{"role": "user", "content": "question 1"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == render_prompt_text(load_tokenizer(bases["llama"]), "internlm_chat", [Turn("question 1", "")])
    assert "<|User|>:question 1" in text
