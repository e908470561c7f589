"""Prompt templates as data: XTuner's exact strings (xtuner/utils/templates.py, 0.1.23 / 0.2.0 fields).

A `Template` holds SYSTEM, INSTRUCTION (placeholders `{system}`, `{input}`, `{round}`, `{bot_name}`), SUFFIX
(appended to each reply, with loss), SUFFIX_AS_EOS (the suffix ends the turn, no EOS token is added), SEP
(after each turn, no loss) and STOP_WORDS (for generation). Turn layout (brackets = loss):

    turn 1: [BOS] SYSTEM INSTRUCTION  [output SUFFIX (EOS)]  SEP
    turn n: ([BOS] if turn n-1 ended with EOS) INSTRUCTION  [output SUFFIX (EOS)]  SEP

Public API:
- `get_template(name, model_default_system=True) -> Template`, `data_template(cfg.data)`, `template_names()`;
  `"auto"` (AUTO) means the tokenizer's own Jinja chat template and is handled by `tunesmith.data.render`
  (it needs the tokenizer).
- `get_system_template(name) -> str`, `SYSTEM_TEMPLATES`, `system_template_names()`.
- `Template.segments(turns, bos=..., eos=..., bot_name=...) -> [(text, with_loss)]` (training layout),
  `Template.render(turns, ...) -> str`, `Template.render_prompt(turns, system=None, bot_name=...) -> str`
  (the prompt asking for the LAST turn's output: chat / eval / serve), `chat_template_jinja(template, add_bos)`
  (a Jinja chat_template rendering the same text, for exported tokenizers).

`Template` itself renders exactly what it is given. With a tokenizer (tunesmith.data.render), a named template
whose layout equals the model's own chat template also adopts the default system prompt that template
injects when a conversation has none (SmolLM2, Qwen2), so both render token-identical text with or without
a system prompt; a named template of another layout keeps XTuner's rule (no system text, no SYSTEM block).
`data.model_default_system: false` (Template.adopt_model_system) applies XTuner's rule to every template.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from tunesmith.data.conversation import Turn
from tunesmith.errors import unknown_name_error

AUTO = "auto"
_PLACEHOLDER = re.compile(r"\{(system|input|round|bot_name)\}")


def _fill(pattern: str, **values: object) -> str:
    """Replace only the known placeholders (a `{` in user text or in the values is left alone)."""
    return _PLACEHOLDER.sub(lambda m: str(values.get(m.group(1), m.group(0))), pattern)


class Segment(NamedTuple):
    text: str
    with_loss: bool
    turn: int  # index of the turn this piece belongs to


@dataclass(frozen=True)
class Template:
    name: str
    system: str = "{system}\n"
    instruction: str = "{input}"
    suffix: str = ""
    suffix_as_eos: bool = False
    sep: str = ""
    stop_words: tuple[str, ...] = field(default_factory=tuple)
    # Whether a conversation without a system prompt takes the model's default one (see
    # tunesmith.data.render.tokenizer_default_system); False renders no system block, as XTuner does.
    adopt_model_system: bool = True

    @property
    def is_auto(self) -> bool:
        return self.name == AUTO

    def format_system(self, system: str, *, round: int = 1, bot_name: str = "BOT") -> str:
        return _fill(self.system, system=_fill(system, bot_name=bot_name), round=round, bot_name=bot_name)

    def format_instruction(self, text: str, *, round: int, bot_name: str = "BOT") -> str:
        return _fill(self.instruction, input=text, round=round, bot_name=bot_name)

    def segments(
        self, turns: Sequence[Turn], *, bos: str = "", eos: str = "", bot_name: str = "BOT", prompt_only: bool = False
    ) -> list[Segment]:
        """The training layout as Segment(text, with_loss, turn) pieces; `bos` / `eos` are the tokenizer's token strings
        ("" when it has none). With prompt_only the last turn stops after its instruction (generation prompt)."""
        if self.is_auto:
            raise ValueError("the auto template renders through the tokenizer (tunesmith.data.render)")
        out: list[Segment] = []
        next_bos = True
        last = len(turns) - 1
        for i, turn in enumerate(turns):
            if next_bos and bos:
                out.append(Segment(bos, False, i))
            prompt = self.format_system(turn.system, round=i + 1, bot_name=bot_name) if turn.system else ""
            prompt += self.format_instruction(turn.input, round=i + 1, bot_name=bot_name)
            out.append(Segment(prompt, False, i))
            if prompt_only and i == last:
                break
            reply = turn.output + (self.suffix if turn.output else "")
            if reply:
                out.append(Segment(reply, turn.output_with_loss, i))
            next_bos = not self.suffix_as_eos
            if next_bos and eos:
                out.append(Segment(eos, turn.output_with_loss, i))
            if self.sep:
                out.append(Segment(self.sep, False, i))
        return out

    def render(self, turns: Sequence[Turn], *, bos: str = "", eos: str = "", bot_name: str = "BOT") -> str:
        return "".join(s.text for s in self.segments(turns, bos=bos, eos=eos, bot_name=bot_name))

    def render_prompt(
        self, turns: Sequence[Turn], *, system: str | None = None, bot_name: str = "BOT", bos: str = "",
        eos: str = "",
    ) -> str:
        """Prompt text asking for the last turn's reply: earlier turns in full (their replies, suffix, EOS, SEP),
        then the last turn's instruction. `system` (when given) goes on the first turn."""
        turns = list(turns)
        if system:
            turns[0] = replace(turns[0], system=system)
        return "".join(s.text for s in self.segments(turns, bos=bos, eos=eos, bot_name=bot_name, prompt_only=True))


def _t(name: str, **kw: object) -> Template:
    if "stop_words" in kw:
        kw["stop_words"] = tuple(kw["stop_words"])  # type: ignore[arg-type]
    return Template(name, **kw)  # type: ignore[arg-type]


_LLAMA2_SYSTEM = (
    "[INST] <<SYS>>\n You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
    "while being safe. Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, "
    "or illegal content. Please ensure that your responses are socially unbiased and positive in nature.\n"
    "{system}\n<</SYS>>\n [/INST] "
)
_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. {system}\n "
)
_DEEPSEEK_CODER_SYSTEM = (
    "You are an AI programming assistant, utilizing the DeepSeek Coder model, developed by DeepSeekCompany, and "
    "you only answer questions related to computer science. For politically sensitive questions, security and "
    "privacy issues, and other non-computer science questions, you will refuse to answer. {system}\n"
)
_CHATML_SYSTEM = "<|im_start|>system\n{system}<|im_end|>\n"
_CHATML_INSTRUCTION = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"

_TEMPLATES = [
    _t("default", system="<|System|>:{system}\n", instruction="<|User|>:{input}\n<|Bot|>:", sep="\n"),
    _t("zephyr", system="<|system|>\n{system}\n", instruction="<|user|>\n{input}\n<|assistant|>\n", sep="\n"),
    _t("internlm_chat", system="<|System|>:{system}\n", instruction="<|User|>:{input}<eoh>\n<|Bot|>:",
       suffix="<eoa>", suffix_as_eos=True, sep="\n", stop_words=["<eoa>"]),
    _t("internlm2_chat", system=_CHATML_SYSTEM, instruction=_CHATML_INSTRUCTION, suffix="<|im_end|>",
       suffix_as_eos=True, sep="\n", stop_words=["<|im_end|>"]),
    _t("moss_sft", system="{system}\n", instruction="<|Human|>: {input}<eoh>\n", sep="\n",
       stop_words=["<eoc>", "<eom>"]),
    _t("llama2_chat", system=_LLAMA2_SYSTEM, instruction="[INST] {input} [/INST]", sep="\n"),
    _t("code_llama_chat", system="{system}\n", instruction="[INST] {input} [/INST]"),
    _t("chatglm2", system="{system}\n", instruction="[Round {round}]\n\n问：{input}\n\n答：", sep="\n\n"),
    _t("chatglm3", system="<|system|>\n{system}", instruction="<|user|>\n{input}<|assistant|>\n", sep="\n"),
    _t("qwen_chat", system=_CHATML_SYSTEM, instruction=_CHATML_INSTRUCTION, suffix="<|im_end|>",
       suffix_as_eos=True, sep="\n", stop_words=["<|im_end|>", "<|endoftext|>"]),
    _t("baichuan_chat", system="{system}\n", instruction="<reserved_102>{input}<reserved_103>", sep="\n"),
    _t("baichuan2_chat", system="{system}\n", instruction="<reserved_106>{input}<reserved_107>", sep="\n"),
    _t("wizardlm", system=_VICUNA_SYSTEM, instruction="USER: {input} ASSISTANT:", sep="\n"),
    _t("wizardcoder", system="Below is an instruction that describes a task. Write a response that appropriately "
       "completes the request.\n\n{system}\n ", instruction="### Instruction:\n{input}\n\n### Response:", sep="\n\n"),
    _t("vicuna", system=_VICUNA_SYSTEM, instruction="USER: {input} ASSISTANT:", sep="\n"),
    _t("deepseek_coder", system=_DEEPSEEK_CODER_SYSTEM, instruction="### Instruction:\n{input}\n### Response:\n",
       sep="\n"),
    _t("deepseekcoder", system=_DEEPSEEK_CODER_SYSTEM, instruction="### Instruction:\n{input}\n### Response:\n",
       sep="\n"),  # XTuner's deprecated alias of deepseek_coder
    _t("deepseek_moe", system="[INST] {system} [/INST]\n", instruction="[INST] {input} [/INST]", sep="\n"),
    _t("deepseek_v2", system="{system}\n\n", instruction="User: {input}\n\nAssistant: ",
       suffix="<｜end▁of▁sentence｜>", suffix_as_eos=True, stop_words=["<｜end▁of▁sentence｜>"]),
    _t("mistral", system="[INST] {system} [/INST]\n", instruction="[INST] {input} [/INST]", sep="\n"),
    _t("mixtral", system="[INST] {system} [/INST]\n", instruction="[INST] {input} [/INST]", sep="\n"),
    _t("minicpm", instruction="<用户> {input} <AI>", sep="\n"),
    _t("minicpm3", system=_CHATML_SYSTEM, instruction=_CHATML_INSTRUCTION, suffix="<|im_end|>",
       suffix_as_eos=True, sep="\n", stop_words=["<|im_end|>", "<|endoftext|>"]),
    _t("gemma", system="<start_of_turn>system\n{system}<end_of_turn>\n",
       instruction="<start_of_turn>user\n{input}<end_of_turn>\n<start_of_turn>model\n", suffix="<end_of_turn>",
       suffix_as_eos=False, sep="\n", stop_words=["<end_of_turn>"]),
    _t("cohere_chat", system="<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{system}<|END_OF_TURN_TOKEN|>",
       instruction="<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{input}<|END_OF_TURN_TOKEN|>"
       "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>", suffix="<|END_OF_TURN_TOKEN|>", suffix_as_eos=True,
       stop_words=["<|END_OF_TURN_TOKEN|>"]),
    _t("llama3_chat", system="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
       instruction="<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|>"
       "<|start_header_id|>assistant<|end_header_id|>\n\n", suffix="<|eot_id|>", suffix_as_eos=True,
       stop_words=["<|eot_id|>"]),
    _t("phi3_chat", system="<|system|>\n{system}<|end|>\n", instruction="<|user|>\n{input}<|end|>\n<|assistant|>\n",
       suffix="<|end|>", suffix_as_eos=True, sep="\n", stop_words=["<|end|>"]),
    # ours: plain ChatML (SmolLM2, and any model whose own template is ChatML)
    _t("chatml", system=_CHATML_SYSTEM, instruction=_CHATML_INSTRUCTION, suffix="<|im_end|>", suffix_as_eos=True,
       sep="\n", stop_words=["<|im_end|>"]),
]
TEMPLATES: dict[str, Template] = {t.name: t for t in _TEMPLATES}
AUTO_TEMPLATE = Template(AUTO, system="", instruction="")

MEDICAL_PROFESSOR = (
    "You are a professional, highly experienced doctor professor. You always provide accurate, comprehensive, "
    "and detailed answers based on the patients' questions."
)
SYSTEM_TEMPLATES: dict[str, str] = {
    "moss_sft": "You are an AI assistant whose name is {bot_name}.\nCapabilities and tools that {bot_name} can "
    "possess.\n- Inner thoughts: enabled.\n- Web search: enabled. API: Search(query)\n- Calculator: enabled. API: "
    "Calculate(expression)\n- Equation solver: enabled. API: Solve(equation)\n- Text-to-image: disabled.\n- Image "
    "edition: disabled.\n- Text-to-speech: disabled.\n",
    "alpaca": "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n",
    "arxiv_gentile": "If you are an expert in writing papers, please generate a good paper title for this paper "
    "based on other authors' descriptions of their abstracts.\n",
    "colorist": "You are a professional color designer. Please provide the corresponding colors based on the "
    "description of Human.\n",
    "coder": "You are a professional programer. Please provide the corresponding code based on the description of "
    "Human.\n",
    "lawyer": "你现在是一名专业的中国律师，请根据用户的问题给出准确、有理有据的回复。\n",
    "medical": "如果你是一名医生，请根据患者的描述回答医学问题。\n",
    "sql": "If you are an expert in SQL, please generate a good SQL Query for Question based on the CREATE TABLE "
    "statement.\n",
    # the InternLM tutorial's MedQA2019 system prompt
    "medical_professor": MEDICAL_PROFESSOR,
}


def template_names() -> list[str]:
    return [AUTO, *TEMPLATES]


def get_template(name: str, *, model_default_system: bool = True) -> Template:
    """The named template; `model_default_system=False` makes it render no system block where the conversation
    has no system prompt (XTuner's rule) instead of the model's default one (config `data.model_default_system`)."""
    if name == AUTO:
        return AUTO_TEMPLATE
    try:
        template = TEMPLATES[name]
    except KeyError:
        raise unknown_name_error("prompt template", name, template_names(), "list-template") from None
    return template if model_default_system else replace(template, adopt_model_system=False)


def data_template(data: Any) -> Template:
    """The template a config's `data` section trains with (its name and its default-system rule)."""
    return get_template(data.prompt_template, model_default_system=data.model_default_system)


def system_template_names() -> list[str]:
    return list(SYSTEM_TEMPLATES)


def get_system_template(name: str) -> str:
    try:
        return SYSTEM_TEMPLATES[name]
    except KeyError:
        raise unknown_name_error("system template", name, SYSTEM_TEMPLATES, "list-template") from None


def resolve_system(system: str = "", system_template: str | None = None, *, bot_name: str = "BOT") -> str:
    """The system text from either a literal or a named system template (placeholders filled)."""
    if system_template:
        return _fill(get_system_template(system_template), bot_name=bot_name)
    return system


# ---------------------------------------------------------------- Jinja export
def _lit(text: str) -> str:
    """A Jinja string literal (JSON escaping is valid Jinja/Python escaping)."""
    return json.dumps(text, ensure_ascii=False)


def _expr(pattern: str, values: dict[str, str]) -> str:
    """`pattern` with placeholders as a Jinja concatenation expression."""
    parts, pos = [], 0
    for m in _PLACEHOLDER.finditer(pattern):
        if m.start() > pos:
            parts.append(_lit(pattern[pos:m.start()]))
        parts.append(values[m.group(1)])
        pos = m.end()
    if pos < len(pattern):
        parts.append(_lit(pattern[pos:]))
    return " ~ ".join(parts) if parts else "''"


def chat_template_jinja(template: Template | str, *, add_bos: bool = False, default_system: str = "") -> str:
    """A Jinja `chat_template` that renders `messages` (system / user / tool / assistant) to the same text as
    `Template.render` / `render_prompt` with the tokenizer's bos/eos token strings (`add_bos`: the tokenizer
    starts sequences with BOS). Messages are grouped into turns as the openai reader groups them for training:
    consecutive user and tool messages form one input (joined by a newline), each assistant message closes a
    turn, and assistant messages before the first user message are skipped. A conversation ending with user /
    tool messages renders as the generation prompt (XTuner's INSTRUCTION already ends with the assistant
    header). `default_system` is used when the conversation has no system message (see
    render.tokenizer_default_system)."""
    t = get_template(template) if isinstance(template, str) else template
    if t.is_auto:
        raise ValueError("the auto template is the tokenizer's own chat_template already")
    bot = "(bot_name if bot_name is defined else 'BOT')"
    values = {"system": "ns.system", "input": "ns.input", "round": "(ns.round | string)", "bot_name": bot}
    system_expr = _expr(t.system, values)
    instr_expr = _expr(t.instruction, values)
    bos = "{% if ns.bos %}{{ bos_token }}{% endif %}" if add_bos else ""
    eos = "" if t.suffix_as_eos else "{{ eos_token }}{% set ns.bos = true %}"
    suffix = f"{{% if message['content'] %}}{{{{ {_lit(t.suffix)} }}}}{{% endif %}}" if t.suffix else ""
    sep = f"{{{{ {_lit(t.sep)} }}}}" if t.sep else ""
    # one turn's prompt: BOS, the pending system text (once), the instruction around the joined input
    prompt = (f"{bos}{{% set ns.round = ns.round + 1 %}}"
              f"{{% if ns.system %}}{{{{ {system_expr} }}}}{{% set ns.system = '' %}}{{% endif %}}"
              f"{{{{ {instr_expr} }}}}{{% set ns.bos = false %}}{{% set ns.input = none %}}")
    return (
        f"{{% set ns = namespace(system={_lit(default_system)}, round=0, bos=true, input=none) %}}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}"
        "{% if loop.first %}{% set ns.system = message['content'] %}"
        "{% else %}{% set ns.system = ns.system ~ message['content'] %}{% endif %}"
        "{% elif message['role'] in ['user', 'tool'] %}"
        "{% if ns.input is none %}{% set ns.input = message['content'] %}"
        "{% else %}{% set ns.input = ns.input ~ '\\n' ~ message['content'] %}{% endif %}"
        "{% elif message['role'] == 'assistant' and ns.input is not none %}"
        f"{prompt}{{{{ message['content'] }}}}{suffix}{eos}{sep}"
        "{% endif %}"
        f"{{% if loop.last and ns.input is not none %}}{prompt}{{% endif %}}"
        "{% endfor %}"
    )
