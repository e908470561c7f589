"""Templates: XTuner's exact strings, layout, system templates, render_prompt and the Jinja export."""

from __future__ import annotations

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tests.data.datahelp import messages
from tunesmith.data.conversation import Turn
from tunesmith.data.templates import (
    MEDICAL_PROFESSOR,
    SYSTEM_TEMPLATES,
    TEMPLATES,
    chat_template_jinja,
    get_system_template,
    get_template,
    resolve_system,
    template_names,
)
from tunesmith.errors import TunesmithError

XTUNER_0_1_23 = {"default", "zephyr", "internlm_chat", "internlm2_chat", "moss_sft", "llama2_chat", "code_llama_chat",
                 "chatglm2", "chatglm3", "qwen_chat", "baichuan_chat", "baichuan2_chat", "wizardlm", "wizardcoder",
                 "vicuna", "deepseek_coder", "deepseekcoder", "deepseek_moe", "deepseek_v2", "mistral", "mixtral",
                 "minicpm", "gemma", "cohere_chat", "llama3_chat", "phi3_chat"}


def test_all_xtuner_names_and_auto():
    names = set(template_names())
    assert XTUNER_0_1_23 <= names and {"auto", "minicpm3", "chatml"} <= names
    assert set(SYSTEM_TEMPLATES) == {"moss_sft", "alpaca", "arxiv_gentile", "colorist", "coder", "lawyer", "medical",
                                     "sql", "medical_professor"}


def test_exact_strings_from_the_reference():
    t = get_template("internlm_chat")
    assert (t.system, t.instruction, t.suffix, t.suffix_as_eos, t.sep, t.stop_words) == (
        "<|System|>:{system}\n", "<|User|>:{input}<eoh>\n<|Bot|>:", "<eoa>", True, "\n", ("<eoa>",))
    q = get_template("qwen_chat")
    assert q.system == "<|im_start|>system\n{system}<|im_end|>\n"  # 0.1.23: no leading "\n"
    assert q.instruction == "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"
    assert q.stop_words == ("<|im_end|>", "<|endoftext|>")
    l3 = get_template("llama3_chat")
    assert l3.sep == "" and l3.suffix == "<|eot_id|>" and l3.suffix_as_eos
    assert get_template("llama2_chat").system.endswith("\n{system}\n<</SYS>>\n [/INST] ")
    assert get_template("chatglm2").instruction == "[Round {round}]\n\n问：{input}\n\n答："
    assert get_template("gemma").suffix_as_eos is False
    assert get_template("minicpm").system == "{system}\n"  # XTuner's default SYSTEM
    assert "programer" in SYSTEM_TEMPLATES["coder"]
    assert get_system_template("medical_professor") == MEDICAL_PROFESSOR == (
        "You are a professional, highly experienced doctor professor. You always provide accurate, comprehensive, "
        "and detailed answers based on the patients' questions.")
    assert resolve_system(system_template="moss_sft", bot_name="Ada").startswith("You are an AI assistant whose name "
                                                                                 "is Ada.\n")


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(TunesmithError) as exc:
        get_template("internlm_chatt")
    assert "unknown prompt template 'internlm_chatt'" in exc.value.message
    assert "internlm_chat" in exc.value.hint and "list-template" in exc.value.hint
    with pytest.raises(TunesmithError, match="unknown system template"):
        get_system_template("doctor")


def test_internlm_chat_two_turn_layout_matches_xtuner_0_1_23():
    turns = [Turn("X", "Y", "S"), Turn("X2", "Y2")]
    segs = get_template("internlm_chat").segments(turns, bos="<s>", eos="</s>")
    assert [(s.text, s.with_loss) for s in segs] == [
        ("<s>", False), ("<|System|>:S\n<|User|>:X<eoh>\n<|Bot|>:", False), ("Y<eoa>", True), ("\n", False),
        ("<|User|>:X2<eoh>\n<|Bot|>:", False), ("Y2<eoa>", True), ("\n", False)]


def test_eos_and_bos_per_turn_without_suffix_as_eos():
    segs = get_template("default").segments([Turn("a", "b"), Turn("c", "d")], bos="<s>", eos="</s>")
    assert [(s.text, s.with_loss, s.turn) for s in segs] == [
        ("<s>", False, 0), ("<|User|>:a\n<|Bot|>:", False, 0), ("b", True, 0), ("</s>", True, 0), ("\n", False, 0),
        ("<s>", False, 1), ("<|User|>:c\n<|Bot|>:", False, 1), ("d", True, 1), ("</s>", True, 1), ("\n", False, 1)]


def test_output_without_loss_and_placeholders_are_safe():
    t = get_template("chatglm2")
    segs = t.segments([Turn("{round} {system}", "r", output_with_loss=False), Turn("b", "c")])
    assert segs[0].text == "[Round 1]\n\n问：{round} {system}\n\n答："  # user braces are not placeholders
    assert segs[1] == ("r", False, 0) and segs[3].text.startswith("[Round 2]")


def test_render_prompt_for_chat():
    t = get_template("internlm2_chat")
    history = [Turn("hi", "hello"), Turn("and now?", "ignored")]
    assert t.render_prompt(history, system="Be kind.") == (
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        "hello<|im_end|>\n<|im_start|>user\nand now?<|im_end|>\n<|im_start|>assistant\n")
    moss = get_template("moss_sft")
    assert moss.render_prompt([Turn("q", "")], system=SYSTEM_TEMPLATES["moss_sft"], bot_name="Ada").startswith(
        "You are an AI assistant whose name is Ada.")


def _jinja(source: str, messages, **kw) -> str:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    return env.from_string(source).render(messages=messages, **kw)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("add_bos", [False, True])
def test_jinja_export_renders_like_the_renderer(name, add_bos):
    t = TEMPLATES[name]
    turns = [Turn("Q1 {x}", "A1"), Turn("Q2", "A2"), Turn("Q3", "")]
    bos = "<s>" if add_bos else ""
    source = chat_template_jinja(t, add_bos=add_bos)
    for system in ("", "Sys {y}"):
        full = [Turn(x.input, x.output, system if i == 0 else "") for i, x in enumerate(turns[:2])]
        assert _jinja(source, messages(full, system), bos_token="<s>", eos_token="</s>") == t.render(
            full, bos=bos, eos="</s>")
        assert _jinja(source, messages(turns, system), bos_token="<s>", eos_token="</s>") == t.render_prompt(
            turns, system=system or None, bos=bos, eos="</s>")


@pytest.mark.parametrize("name", ["chatml", "internlm2_chat", "llama3_chat", "default"])
def test_jinja_export_groups_tool_and_user_messages_like_the_openai_reader(name):
    from tunesmith.data.readers import openai_map_fn

    t = TEMPLATES[name]
    msgs = [{"role": "assistant", "content": "stray greeting"},  # before any user: skipped, as in training
            {"role": "system", "content": "S"}, {"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": "Action: search"}, {"role": "tool", "content": "18C, sunny"},
            {"role": "user", "content": "and tomorrow?"}, {"role": "assistant", "content": "Rain."}]
    turns = openai_map_fn({"messages": msgs})
    assert [x.input for x in turns] == ["weather in Paris?", "18C, sunny\nand tomorrow?"]
    source = chat_template_jinja(t)
    assert _jinja(source, msgs, bos_token="<s>", eos_token="</s>") == t.render(turns, bos="", eos="</s>")
    # ending on a tool result: the generation prompt for the model's next step
    prompt_msgs = msgs[:5]
    assert _jinja(source, prompt_msgs, bos_token="<s>", eos_token="</s>") == t.render_prompt(
        [turns[0], Turn("18C, sunny", "")], system="S", bos="", eos="</s>")


def test_jinja_export_through_transformers(smol_tok):
    import copy

    tok = copy.deepcopy(smol_tok)
    t = get_template("chatml")
    tok.chat_template = chat_template_jinja(t)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "more"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == t.render_prompt([Turn("hi", "yo"), Turn("more", "")], system="S")
    # with the model's default system prompt the export renders exactly like SmolLM2's own template
    from tunesmith.data.render import tokenizer_default_system

    tok.chat_template = chat_template_jinja(t, default_system=tokenizer_default_system(smol_tok, t))
    for m in (msgs, msgs[1:], msgs[1:3]):
        ours = tok.apply_chat_template(m, tokenize=False, add_generation_prompt=m[-1]["role"] == "user")
        assert ours == smol_tok.apply_chat_template(m, tokenize=False, add_generation_prompt=m[-1]["role"] == "user")
