"""convert merge: merged logits equal base + adapter through peft; layouts, options and bad input."""

from __future__ import annotations

import errno
import json
import shutil

import pytest
import torch

from tests.export.helpers import IDS, model_logits, peft_logits, read_json
from tunesmith.errors import TunesmithError
from tunesmith.export.merge import merge_adapter
from tunesmith.export.shards import list_tensors

FP32_ATOL = 1e-5


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = FP32_ATOL) -> None:
    diff = (a - b).abs().max().item()
    assert diff <= atol, f"max |diff| {diff} > {atol}"


# ------------------------------------------------------------------------------------------ exactness
CASES = {
    "llama": dict(),
    "qwen2": dict(bias="lora_only", rslora=True),  # trained q/k/v biases, alpha / sqrt(r)
    "internlm": dict(bias="all"),  # v1: q/k/v/o biases, same names as Llama
    "internlm2": dict(),  # v2: q/k/v deltas fused back into wqkv rows
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_merged_logits_equal_peft(kind, bases, adapter_factory, tmp_path, monkeypatch):
    import transformers

    import tunesmith.models as models

    base = bases[kind]
    adapter = adapter_factory(base, **CASES[kind])

    def forbidden(*a, **k):
        raise AssertionError("the streaming merge must never build the model")

    with monkeypatch.context() as m:
        m.setattr(models, "load_model", forbidden)
        m.setattr(transformers.AutoModelForCausalLM, "from_pretrained", forbidden)
        m.setattr(transformers.PreTrainedModel, "from_pretrained", forbidden)
        result = merge_adapter(base, adapter, tmp_path / "merged", max_shard_size="100KB")
    assert len(result.shards) > 1 and (tmp_path / "merged" / "model.safetensors.index.json").is_file()
    merged = model_logits(tmp_path / "merged")
    reference = peft_logits(base, adapter)
    assert (reference - model_logits(base)).abs().max() > 0.05  # the adapter changes the model
    _close(merged, reference)


@pytest.mark.parametrize("kind", ["internlm", "internlm2"])
def test_internlm_written_in_its_own_layout(kind, bases, adapter_factory, tmp_path):
    base = bases[kind]
    merge_adapter(base, adapter_factory(base), tmp_path / "m")
    names = {r.name for r in list_tensors([tmp_path / "m" / "model.safetensors"])}
    assert names == {r.name for r in list_tensors([base / "model.safetensors"])}
    assert read_json(tmp_path / "m" / "config.json")["model_type"] == kind
    assert (tmp_path / "m" / "tokenizer.model").is_file() and (tmp_path / "m" / "generation_config.json").is_file()


def test_internlm_bin_base(tiny_internlm_bin, adapter_factory, tmp_path):
    adapter = adapter_factory(tiny_internlm_bin)
    merge_adapter(tiny_internlm_bin, adapter, tmp_path / "m")
    names = {r.name for r in list_tensors([tmp_path / "m" / "model.safetensors"])}
    assert any(n.endswith("rotary_emb.inv_freq") for n in names)  # buffers kept as they came
    _close(model_logits(tmp_path / "m"), peft_logits(tiny_internlm_bin, adapter))


@pytest.mark.parametrize("kind", ["llama", "internlm2"])
def test_qlora_adapter_merged_into_full_precision_base(kind, bases, adapter_factory, tmp_path):
    pytest.importorskip("bitsandbytes")
    base = bases[kind]
    adapter = adapter_factory(base, bits=4)  # trained on the NF4-quantized base
    merge_adapter(base, adapter, tmp_path / "m")
    _close(model_logits(tmp_path / "m"), peft_logits(base, adapter))


def test_bf16_output(bases, adapter_factory, tmp_path):
    base = bases["llama"]
    adapter = adapter_factory(base)
    merge_adapter(base, adapter, tmp_path / "m", dtype="bf16")
    assert {r.dtype for r in list_tensors([tmp_path / "m" / "model.safetensors"])} == {torch.bfloat16}
    assert read_json(tmp_path / "m" / "config.json")["dtype"] == "bfloat16"
    merged = model_logits(tmp_path / "m", dtype="bf16")
    reference_bf16 = peft_logits(base, adapter, dtype="bf16")
    reference = peft_logits(base, adapter)
    # one bf16 rounding of W + delta: at least as close to the fp32 truth as peft's bf16 merge path
    err_ours = (merged - reference).abs().max().item()
    err_peft = (reference_bf16 - reference).abs().max().item()
    assert err_ours < 0.05 and err_ours <= err_peft * 1.5 + 1e-3


def test_modules_to_save_with_tied_embeddings(bases, adapter_factory, tmp_path):
    """Qwen2 ties the head to the embedding; a trained lm_head copy must come out untied."""
    base = bases["qwen2"]
    for i, modules in enumerate((["lm_head"], ["embed_tokens", "lm_head"], ["embed_tokens"])):
        adapter = adapter_factory(base, modules_to_save=modules)
        out = tmp_path / f"m{i}"
        merge_adapter(base, adapter, out)
        assert read_json(out / "config.json")["tie_word_embeddings"] is False
        _close(model_logits(out), peft_logits(base, adapter))


VARIANTS = {
    "lora_bias": ("qwen2", dict(target_modules=["q_proj", "v_proj"], lora_bias=True)),  # B's bias -> layer bias
    "rank_alpha_patterns": ("qwen2", dict(target_modules=["q_proj", "v_proj", "down_proj"],
                                          rank_pattern={"down_proj": 2},
                                          alpha_pattern={r"layers\.1\.self_attn\.q_proj": 32})),
    "embedding_lora_tied": ("qwen2", dict(target_modules=["embed_tokens", "q_proj"])),  # lora_embedding_A/B
    "embedding_lora": ("llama", dict(target_modules=["embed_tokens", "q_proj"])),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lora_variants(variant, bases, tmp_path):
    from peft import LoraConfig, get_peft_model

    from tests.export.helpers import randomize_lora
    from tunesmith.models import load_model

    kind, options = VARIANTS[variant]
    base = bases[kind]
    pm = get_peft_model(load_model(base, dtype="fp32"), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **options))
    randomize_lora(pm, 3)
    if "alpha_pattern" in options:  # the patterns really apply
        layers = pm.base_model.model.model.layers
        assert layers[1].self_attn.q_proj.scaling["default"] == 8 and layers[0].mlp.down_proj.r["default"] == 2
    pm.save_pretrained(tmp_path / "ad")
    merge_adapter(base, tmp_path / "ad", tmp_path / "m")
    _close(model_logits(tmp_path / "m"), peft_logits(base, tmp_path / "ad"))


def test_gpu_device_when_asked_without_gpu(bases, adapter_factory, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(TunesmithError, match="no CUDA GPU"):
        merge_adapter(bases["llama"], adapter_factory(bases["llama"]), tmp_path / "m", device="cuda")


@pytest.mark.gpu
def test_merge_on_gpu(bases, adapter_factory, tmp_path):
    base = bases["llama"]
    adapter = adapter_factory(base)
    result = merge_adapter(base, adapter, tmp_path / "m", device="cuda")
    assert result.device.startswith("cuda")
    _close(model_logits(tmp_path / "m"), peft_logits(base, adapter), atol=1e-4)


# ------------------------------------------------------------------------------------------ output folder
def test_merged_folder_loads_in_plain_transformers(bases, adapter_factory, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = bases["llama"]
    adapter = adapter_factory(base)
    merge_adapter(base, adapter, tmp_path / "m", max_shard_size="200KB")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        _close(model(input_ids=IDS).logits, peft_logits(base, adapter))
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert tok.chat_template  # the base's own, carried over
    assert (tmp_path / "m" / "generation_config.json").is_file()
    index = read_json(tmp_path / "m" / "model.safetensors.index.json")
    assert index["metadata"]["total_size"] == sum(
        r.nbytes for r in list_tensors(sorted((tmp_path / "m").glob("model-*.safetensors"))))


def test_adapter_tokenizer_and_template_win(bases, adapter_factory, tmp_path):
    base = bases["llama"]
    adapter = tmp_path / "ad"
    shutil.copytree(adapter_factory(base), adapter)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    tok.save_pretrained(adapter)
    merge_adapter(base, adapter, tmp_path / "m")
    out = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert out.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<<hi>>"


# ------------------------------------------------------------------------------------------ bad input
def test_destination_exists(bases, adapter_factory, tmp_path):
    base, adapter = bases["llama"], adapter_factory(bases["llama"])
    dst = tmp_path / "m"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(TunesmithError, match="already exists") as info:
        merge_adapter(base, adapter, dst)
    assert "--overwrite" in info.value.hint and (dst / "keep.txt").exists()
    merge_adapter(base, adapter, dst, overwrite=True)
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").is_file()
    with pytest.raises(TunesmithError, match="would replace the input"):
        merge_adapter(base, adapter, base, overwrite=True)


def test_adapter_base_mismatch_names_modules(bases, adapter_factory, tmp_path):
    from safetensors.torch import load_file, save_file

    src = adapter_factory(bases["llama"])
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    state = load_file(bad / "adapter_model.safetensors")
    state = {k.replace("layers.1.", "layers.7."): v for k, v in state.items()}
    save_file(state, bad / "adapter_model.safetensors")
    with pytest.raises(TunesmithError) as info:
        merge_adapter(bases["llama"], bad, tmp_path / "m")
    assert "model.layers.7.mlp.down_proj.weight" in info.value.message
    assert "base_model_name_or_path" in info.value.hint
    assert not (tmp_path / "m").exists()


def test_adapter_shape_mismatch(bases, adapter_factory, tmp_path):
    # InternLM v1 has 4 key/value heads, the tiny Llama 2: k_proj deltas do not fit
    with pytest.raises(TunesmithError, match="k_proj"):
        merge_adapter(bases["llama"], adapter_factory(bases["internlm"]), tmp_path / "m")


def test_quantized_base_refused(bases, adapter_factory, tmp_path):
    base = tmp_path / "q"
    shutil.copytree(bases["llama"], base)
    config = read_json(base / "config.json")
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(TunesmithError, match="quantized .bitsandbytes 4-bit.") as info:
        merge_adapter(base, adapter_factory(bases["llama"]), tmp_path / "m")
    assert "full-precision" in info.value.hint


def test_swapped_arguments(bases, adapter_factory, tmp_path):
    with pytest.raises(TunesmithError, match="order is") as info:
        merge_adapter(adapter_factory(bases["llama"]), bases["llama"], tmp_path / "m")
    assert "BASE ADAPTER SAVE_DIR" in info.value.hint


def test_not_lora_and_unsupported(bases, adapter_factory, tmp_path):
    bad = tmp_path / "ad"
    shutil.copytree(adapter_factory(bases["llama"]), bad)
    config = read_json(bad / "adapter_config.json")
    (bad / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(TunesmithError, match="DoRA"):
        merge_adapter(bases["llama"], bad, tmp_path / "m")
    (bad / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(TunesmithError, match="not LORA"):
        merge_adapter(bases["llama"], bad, tmp_path / "m")


def test_disk_full_leaves_nothing(bases, adapter_factory, tmp_path, monkeypatch):
    from tunesmith.export import shards

    calls = {"n": 0}
    real = shards.ShardWriter.write

    def failing(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, tensor)

    monkeypatch.setattr(shards.ShardWriter, "write", failing)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(TunesmithError, match="no space left"):
        merge_adapter(bases["llama"], adapter_factory(bases["llama"]), out / "m", max_shard_size="50KB")
    assert list(out.iterdir()) == []  # neither the folder nor a temporary


def test_not_enough_space_is_checked_first(bases, adapter_factory, tmp_path, monkeypatch):
    import collections

    from tunesmith.export import folder

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(folder.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(TunesmithError, match="not enough disk space"):
        merge_adapter(bases["llama"], adapter_factory(bases["llama"]), tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_bad_shard_size(bases, adapter_factory, tmp_path):
    with pytest.raises(TunesmithError, match="not a size"):
        merge_adapter(bases["llama"], adapter_factory(bases["llama"]), tmp_path / "m", max_shard_size="2 gigs")


@pytest.mark.slow
def test_builtin_smollm2_merge(smollm2_path, adapter_factory, tmp_path):
    """The embedded SmolLM2-135M (tied embeddings) named as builtin:, merged through the CLI entry point."""
    from tunesmith.cli.main import main

    adapter = adapter_factory(smollm2_path, r=8, target_modules=["q_proj", "v_proj", "down_proj"])
    with pytest.raises(SystemExit) as info:
        main(["convert", "merge", "builtin:smollm2-135m-instruct", str(adapter), str(tmp_path / "m"),
              "--max-shard-size", "100MB"])
    assert info.value.code in (0, None)
    ids = torch.tensor([[1, 2, 3, 400, 5000, 60, 7]])
    reference = peft_logits(smollm2_path, adapter, ids=ids)
    # 30 fp32 layers: merged (W + BA) x and W x + B(A x) round differently; relative 1e-5 of the logit scale
    _close(model_logits(tmp_path / "m", ids=ids), reference, atol=1e-5 * reference.abs().max().item())
