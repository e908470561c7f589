"""The adapter's own template and system prompt in chat / serve / eval, and `data.model_default_system`."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.export.helpers import train_config, write_checkpoint, write_config
from tunesmith.data import Turn
from tunesmith.data.render import render_conversation, render_prompt_text
from tunesmith.data.templates import data_template, get_template
from tunesmith.errors import TunesmithError
from tunesmith.export.pth_to_hf import pth_to_hf
from tunesmith.infer.trained_prompt import TrainedPrompt, choose_prompt, read_trained_prompt


@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory):
    """A tunesmith adapter trained with internlm_chat, a system prompt and no model default system."""
    root = tmp_path_factory.mktemp("trained_prompt")
    cfg = train_config(tiny_llama, "lora", template="internlm_chat",
                       data={"system": "Be brief.", "model_default_system": False})
    ckpt, _ = write_checkpoint(cfg, root / "work" / "epoch_1.pth")
    config = write_config(cfg, root / "cfg.yaml")
    pth_to_hf(config, ckpt, root / "hf")
    return root / "hf"


# ----------------------------------------------------------------- model_default_system (data, training)
def test_model_default_system_switches_the_default_system_block(smollm2_path):
    from tunesmith.models import load_tokenizer

    tok = load_tokenizer(smollm2_path)
    turns = [Turn("Hi", "Hello")]
    adopted = render_conversation(turns, tok, get_template("chatml")).text
    own = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                                  tokenize=False)
    assert adopted == own and "<|im_start|>system\nYou are a helpful AI assistant named SmolLM" in adopted
    bare = render_conversation(turns, tok, get_template("chatml", model_default_system=False)).text
    assert bare == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    prompt = render_prompt_text(tok, get_template("chatml", model_default_system=False), [Turn("Hi", "")])
    assert "system" not in prompt
    # an explicit system prompt is rendered either way
    given = render_conversation([Turn("Hi", "Hello", "Be brief.")], tok,
                                get_template("chatml", model_default_system=False)).text
    assert given.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_config_key_reaches_the_template_and_refuses_auto(tiny_llama):
    cfg = train_config(tiny_llama, template="chatml", data={"model_default_system": False})
    assert data_template(cfg.data).adopt_model_system is False
    assert data_template(train_config(tiny_llama, template="chatml").data).adopt_model_system is True
    with pytest.raises(Exception, match="model_default_system false needs a named prompt_template"):
        train_config(tiny_llama, template="auto", data={"model_default_system": False})


def test_the_flag_joins_the_dataset_cache_key(tiny_llama):
    from tunesmith.data.dataset import cache_key
    from tunesmith.models import load_tokenizer

    tok = load_tokenizer(tiny_llama)
    on = train_config(tiny_llama, template="chatml")
    off = train_config(tiny_llama, template="chatml", data={"model_default_system": False})
    assert cache_key(on, tok) != cache_key(off, tok)


# ---------------------------------------------------------------------------- the adapter's record
def test_pth_to_hf_records_the_training_prompt(adapter):
    meta = json.loads((adapter / "tunesmith_meta.json").read_text())
    assert meta["prompt"] == {"template": "internlm_chat", "system": "Be brief.", "model_default_system": False}
    assert read_trained_prompt(adapter) == TrainedPrompt("internlm_chat", "Be brief.", False)


def test_older_adapter_folders_fall_back_to_the_saved_config(adapter, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(adapter, old)
    meta = json.loads((old / "tunesmith_meta.json").read_text())
    del meta["prompt"]
    (old / "tunesmith_meta.json").write_text(json.dumps(meta))
    assert read_trained_prompt(old) == TrainedPrompt("internlm_chat", "Be brief.", False)


def test_adapters_from_other_tools_have_no_record(adapter, tmp_path):
    import shutil

    peft_only = tmp_path / "peft"
    peft_only.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(adapter / name, peft_only / name)
    assert read_trained_prompt(peft_only) is None
    assert read_trained_prompt(None) is None
    assert choose_prompt(peft_only, None, "") == (None, "")


def test_choose_prompt_defaults_to_the_adapter_and_warns_once_on_another(adapter):
    warnings: list[str] = []
    template, system = choose_prompt(adapter, None, "", warn=warnings.append)
    assert (template.name, template.adopt_model_system, system) == ("internlm_chat", False, "Be brief.")
    template, system = choose_prompt(adapter, "internlm_chat", "Answer in French.", warn=warnings.append)
    assert (template.name, system) == ("internlm_chat", "Answer in French.") and not warnings
    template, system = choose_prompt(adapter, "chatml", "", warn=warnings.append)
    assert template == "chatml" and system == "Be brief."
    assert len(warnings) == 1 and "chatml" in warnings[0] and "internlm_chat" in warnings[0]


def test_chat_api_and_engine_use_the_adapters_template(tiny_llama, adapter, capsys):
    from tunesmith.infer import Chat
    from tunesmith.infer.engine import Engine

    chat = Chat(str(tiny_llama), adapter=str(adapter), torch_dtype="fp32", max_new_tokens=4, temperature=0)
    assert chat.session.template.name == "internlm_chat" and chat.session.system == "Be brief."
    with Engine.load(str(tiny_llama), adapter=str(adapter), torch_dtype="fp32") as engine:
        assert engine.template.name == "internlm_chat" and engine.system == "Be brief."
        ids = engine.prompt_ids([{"role": "user", "content": "hello"}])
    text = chat.tokenizer.decode(ids)
    assert "Be brief." in text and "<|User|>:hello" in text
    Chat(str(tiny_llama), adapter=str(adapter), prompt_template="chatml", torch_dtype="fp32")
    assert capsys.readouterr().err.count("differs from the template the adapter was trained with") == 1


def test_chat_cli_says_the_template_comes_from_the_adapter(tiny_llama, adapter):
    import io

    from tunesmith.infer.chat_app import ChatOptions, run_chat

    out = io.StringIO()
    opts = ChatOptions(model=str(tiny_llama), adapter=str(adapter), torch_dtype="fp32", max_new_tokens=2,
                       temperature=0.0)
    import contextlib

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        run_chat(opts, stdin=io.StringIO("hello\n\nexit\n"), stdout=out)
    assert "model ready: template internlm_chat (the adapter's)" in err.getvalue()
    err = io.StringIO()
    opts.prompt_template = "chatml"  # the user's choice is not labelled as the adapter's
    with contextlib.redirect_stderr(err):
        run_chat(opts, stdin=io.StringIO("hello\n\nexit\n"), stdout=io.StringIO())
    assert "model ready: template chatml, decoding" in err.getvalue()


def test_flag_change_is_a_different_adapter_setup(tiny_llama, adapter, tmp_path):
    """pth_to_hf refuses a config whose default-system rule differs from the checkpoint's."""
    root = adapter.parent
    cfg = train_config(tiny_llama, "lora", template="internlm_chat", data={"system": "Be brief."})
    with pytest.raises(TunesmithError, match="model_default_system"):
        pth_to_hf(write_config(cfg, tmp_path / "other.yaml"), root / "work" / "epoch_1.pth", tmp_path / "out")


def test_checkpoints_saved_before_the_key_existed_still_convert(tiny_llama, tmp_path):
    cfg = train_config(tiny_llama, "lora", template="internlm_chat")
    ckpt, _ = write_checkpoint(cfg, tmp_path / "work" / "epoch_1.pth")
    saved = yaml.safe_load((ckpt / "config.yaml").read_text())
    del saved["data"]["model_default_system"]
    (ckpt / "config.yaml").write_text(yaml.safe_dump(saved))
    pth_to_hf(write_config(cfg, tmp_path / "cfg.yaml"), ckpt, tmp_path / "hf")
    assert read_trained_prompt(tmp_path / "hf").model_default_system is True
