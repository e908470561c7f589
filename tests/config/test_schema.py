"""Config schema: XTuner defaults, overrides, did-you-mean errors and cross-field rules."""

import pytest
import yaml

from tunesmith.config import TrainConfig, build_recipe, dump_config, load_config, recipe_names
from tunesmith.config.load import validate
from tunesmith.config.overrides import apply_overrides
from tunesmith.errors import TunesmithError


def test_defaults_are_xtuners():
    cfg = TrainConfig()
    t = cfg.training
    assert cfg.method == "qlora" and cfg.quantization.bits == 4 and cfg.quantization.quant_type == "nf4"
    assert cfg.data.max_length == 2048 and cfg.data.pack_to_max_length
    assert (t.batch_size, t.accumulative_counts, t.lr, t.betas, t.weight_decay, t.max_norm) == (
        1, 16, 2e-4, (0.9, 0.999), 0.0, 1.0)
    assert (t.warmup_ratio, t.lr_scheduler, t.max_epochs) == (0.03, "cosine", 3)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (64, 16, 0.1)
    assert cfg.evaluation.every_n_steps == 500 and t.save_epochs


def test_seed_recipes_exist_and_compose():
    names = set(recipe_names())
    for name in ("internlm_chat_7b_qlora_oasst1_e3", "internlm_chat_7b_qlora_medqa2019_e3",
                 "internlm_7b_qlora_msagent_react_e3_gpu8"):
        assert name in names
    for method in ("lora", "qlora", "full"):
        for data in ("oasst1", "medqa2019", "alpaca"):
            assert f"smollm2_135m_instruct_{method}_{data}_e1" in names

    qlora = build_recipe("internlm_chat_7b_qlora_oasst1_e3")
    assert qlora.method == "qlora" and qlora.quantization.bits == 4 and qlora.quantization.double_quant
    assert qlora.model.path == "internlm/internlm-chat-7b" and qlora.data.prompt_template == "internlm_chat"

    agent = build_recipe("internlm_7b_qlora_msagent_react_e3_gpu8")
    assert agent.training.batch_size == 8 and not agent.data.pack_to_max_length
    assert agent.data.prompt_template == "default" and agent.data.format == "msagent_react"

    med = build_recipe("internlm_chat_7b_qlora_medqa2019_e3")
    assert med.data.system_template == "medical_professor" and med.data.format == "conversation"

    full = build_recipe("internlm_chat_7b_full_oasst1_e3")
    assert full.quantization.bits is None and full.training.lr == 2e-5


@pytest.mark.parametrize("name", ["internlm_chat_7b_qlora_oasst1_e3", "smollm2_135m_instruct_lora_alpaca_e1",
                                  "internlm_7b_qlora_msagent_react_e3_gpu8"])
def test_dump_round_trips(name):
    cfg = build_recipe(name)
    text = dump_config(cfg, name=name)
    assert "# LoRA rank" in text  # every key carries its comment
    again = validate(yaml.safe_load(text), "dumped")
    assert again == cfg
    assert dump_config(again, name=name) == text


def test_every_recipe_validates():
    for name in recipe_names():
        build_recipe(name)


def test_overrides_parse_yaml_values():
    data = apply_overrides({}, ["training.lr=1e-4", "data.pack_to_max_length=false", "evaluation.inputs=[a, b]",
                                "quantization.bits=null", "model.path=./x=y"])
    cfg = validate({**data, "method": "lora"}, "cli")
    assert cfg.training.lr == 1e-4 and cfg.data.pack_to_max_length is False
    assert cfg.evaluation.inputs == ["a", "b"] and cfg.model.path == "./x=y"


def test_unknown_key_suggests(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  learning_rate: 0.1\n")
    with pytest.raises(TunesmithError) as err:
        load_config(str(path))
    assert "unknown config key 'training.learning_rate'" in str(err.value)
    assert str(path) in str(err.value)


def test_unknown_key_did_you_mean():
    with pytest.raises(TunesmithError) as err:
        load_config("internlm_chat_7b_qlora_oasst1_e3", ["training.max_epoch=2"])
    assert "did you mean 'max_epochs'" in str(err.value)


def test_bad_value_names_key():
    with pytest.raises(TunesmithError) as err:
        load_config("internlm_chat_7b_qlora_oasst1_e3", ["lora.r=zero"])
    assert "lora.r" in str(err.value) and "'zero'" in str(err.value)


@pytest.mark.parametrize("overrides, phrase", [
    (["method=lora", "quantization.bits=4"], "trains an unquantized base"),
    (["method=full", "quantization.bits=4"], "full fine-tuning cannot train quantized"),
    (["distributed.deepspeed=deepspeed_zero3"], "quant_storage"),
    (["data.system=hi", "data.system_template=alpaca"], "not both"),
])
def test_cross_field_rules(overrides, phrase):
    with pytest.raises(TunesmithError) as err:
        load_config("internlm_chat_7b_qlora_oasst1_e3", overrides)
    assert phrase in str(err.value)


def test_malformed_yaml_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("training:\n  lr: [1,\n  x: 2\n")
    with pytest.raises(TunesmithError) as err:
        load_config(str(path))
    assert "bad.yaml line" in str(err.value)


def test_unknown_recipe_and_missing_file():
    with pytest.raises(TunesmithError, match="unknown config 'internlm_chat_7b_qlora_oasst_e3'"):
        load_config("internlm_chat_7b_qlora_oasst_e3")
    with pytest.raises(TunesmithError, match="does not exist"):
        load_config("nowhere/my.yaml")


def test_speed_switches_read_yaml_booleans():
    """``liger_kernel: on`` / ``compile: off`` in YAML arrive as booleans: they mean the switch they spell."""
    speed = TrainConfig(**yaml.safe_load("speed: {liger_kernel: on, compile: off}")).speed
    assert (speed.liger_kernel, speed.compile) == ("on", "off")
    assert TrainConfig().speed.compile == "auto"
