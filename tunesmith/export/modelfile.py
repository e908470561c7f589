"""`--ollama`: a Modelfile beside the GGUF, whose TEMPLATE renders the prompt the model was trained on.

Which prompt:
1. `--prompt-template NAME` when given (the Modelfile's comment says so when it is not the trained one);
2. else the one an adapter folder from `convert pth_to_hf` records (tunesmith_meta.json "prompt": template,
   system prompt, default-system rule);
3. else (and for an `auto` record) the named template that renders exactly as the tokenizer's own chat template
   (probed on a two-turn conversation with a system prompt; ChatML first), so SmolLM2 / Qwen-style models get
   `chatml`. A tokenizer whose template none matches is refused with a hint to pass --prompt-template: a Jinja
   template cannot in general be turned into Ollama's Go template.

The Go template walks `.Messages` as tunesmith.data.templates.chat_template_jinja walks `messages`: a system
message is held until the next user turn, whose prompt is SYSTEM (filled) + INSTRUCTION (filled); an assistant
message is the reply + SUFFIX (+ EOS, and BOS before the next prompt, when the template's suffix does not end the
turn itself) + SEP. The first BOS is not in the template: Ollama adds it as the GGUF says (add_bos_token).
Consecutive user messages are joined by Ollama itself (with a blank line, where training joined them with one
newline); `{bot_name}` is filled with "BOT" as training does by default; a template numbering its rounds
({round}: chatglm2) is refused. All literal text is written as Go string constants, so no whitespace of the
template's own layout leaks into the prompt.

SYSTEM is the system prompt training used (the adapter's record), else the default system prompt the model's
own chat template injects when the layout is the same (SmolLM2's); PARAMETER stop: the template's stop words
and the EOS token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.data.conversation import Turn
from tunesmith.data.templates import TEMPLATES, Template, get_template
from tunesmith.errors import TunesmithError
from tunesmith.export.prompt_record import META_FILE, read_trained_prompt

_PROBE = [Turn("Hi there", "Hello! How can I help?", "Be brief."), Turn("Say two words.", "Two words.")]


@dataclass(frozen=True)
class OllamaPrompt:
    template: Template
    system: str
    stop_words: tuple[str, ...]
    source: str  # where the template came from, for the command's report


def matching_template(tokenizer: Any) -> Template | None:
    """The named template rendering a probe conversation exactly as the tokenizer's chat template does."""
    from tunesmith.data.render import tokenizer_info

    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "system", "content": _PROBE[0].system}]
    for turn in _PROBE:
        messages += [{"role": "user", "content": turn.input}, {"role": "assistant", "content": turn.output}]
    try:
        theirs = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that rejects a system message or the probe
        return None
    info = tokenizer_info(tokenizer)
    for name in ["chatml", *[n for n in TEMPLATES if n != "chatml"]]:
        template = get_template(name)
        if template.render(_PROBE, bos=info.bos_text, eos=info.eos_text) == theirs:
            return template
    return None


def choose_prompt(tokenizer: Any, adapter: str | Path | None, prompt_template: str | None) -> OllamaPrompt:
    from tunesmith.data.render import tokenizer_default_system
    from tunesmith.data.stopwords import stop_words_for

    record = read_trained_prompt(adapter)
    system = record.system if record else ""
    default_rule = record.model_default_system if record else True
    if prompt_template and prompt_template != "auto":
        template, source = get_template(prompt_template, model_default_system=default_rule), "--prompt-template"
        if record and record.template != prompt_template:
            source += f", not the {record.template} template the adapter was trained with"
    elif record and record.template != "auto" and not prompt_template:
        template = record.as_template()
        source = f"the adapter's training record ({META_FILE})"
    else:
        template = matching_template(tokenizer)
        if template is None:
            raise TunesmithError(
                "--ollama: the tokenizer's chat template is not one of tunesmith's named templates, and a Jinja "
                "template cannot be turned into Ollama's Go template",
                "pass --prompt-template NAME (see `tunesmith list-template`)",
            )
        if not default_rule:
            template = get_template(template.name, model_default_system=False)
        source = "the tokenizer's chat template (same layout)"
    system = system or tokenizer_default_system(tokenizer, template)
    return OllamaPrompt(template, system, tuple(stop_words_for(template, tokenizer)), source)


# ------------------------------------------------------------------------------------------ Go template
def _go(text: str) -> str:
    """A Go template action printing `text` (a JSON string is a valid Go string literal)."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def _go_fill(pattern: str, variable: str, placeholder: str) -> str:
    """`pattern` as actions: its literal text as constants, `{placeholder}` as `variable`."""
    pattern = pattern.replace("{bot_name}", "BOT")
    pieces = pattern.split("{" + placeholder + "}")
    return ("{{ " + variable + " }}").join(_go(p) for p in pieces)


def _line(*actions: str) -> str:
    """One line of the template: its first action trims the line break before it, so only actions print."""
    text = "".join(actions)
    return "{{-" + text[2:] if text.startswith("{{") else text


def go_template(template: Template, *, bos: str = "", eos: str = "") -> str:
    """Ollama's TEMPLATE for `template` (`bos` / `eos`: the tokenizer's token texts; bos "" when it adds none)."""
    if "{round}" in template.system + template.instruction:
        raise TunesmithError(
            f"--ollama: the {template.name} template numbers its rounds ({{round}}), which an Ollama template "
            "cannot count",
            "pass --prompt-template with another layout, or write the Modelfile's TEMPLATE by hand",
        )
    ends_turn = not template.suffix_as_eos  # EOS closes each reply, and the next prompt starts with BOS
    reply_end = ""
    if ends_turn and eos:
        reply_end = _go(eos) + ("{{ $bos = true }}" if bos else "")
    suffix = "{{ if $m.Content }}" + _go(template.suffix) + "{{ end }}" if template.suffix else ""
    lines = [
        _line('{{ $system := "" }}{{ $open := false }}{{ $bos := false }}'),
        _line("{{ range $m := .Messages }}"),
        _line('{{ if eq $m.Role "system" }}{{ $system = printf "%s%s" $system $m.Content }}'),
        _line('{{ else if or (eq $m.Role "user") (eq $m.Role "tool") }}'),
        _line("{{ if $bos }}", _go(bos), "{{ $bos = false }}{{ end }}") if ends_turn and bos else "",
        _line("{{ if $system }}", _go_fill(template.system, "$system", "system"), '{{ $system = "" }}{{ end }}'),
        _line(_go_fill(template.instruction, "$m.Content", "input"), "{{ $open = true }}"),
        _line('{{ else if and (eq $m.Role "assistant") $open }}{{ $m.Content }}', suffix, reply_end,
              _go(template.sep), "{{ $open = false }}"),
        _line("{{ end }}"),
        _line("{{ end }}"),
    ]
    return "\n".join(line for line in lines if line)


def _quoted_block(keyword: str, text: str) -> str:
    if '"""' in text:
        raise TunesmithError(f'--ollama: the {keyword.lower()} text contains """, which a Modelfile cannot quote',
                             "change that text, or write the Modelfile by hand")
    return f'{keyword} """{text}"""'


def modelfile_text(gguf_name: str, prompt: OllamaPrompt, *, bos: str = "", eos: str = "") -> str:
    lines = [f"# written by tunesmith convert gguf: template {prompt.template.name}, from {prompt.source}",
             f"FROM ./{gguf_name}",
             _quoted_block("TEMPLATE", go_template(prompt.template, bos=bos, eos=eos))]
    if prompt.system:
        lines.append(_quoted_block("SYSTEM", prompt.system))
    for word in prompt.stop_words:
        lines.append(f"PARAMETER stop {json.dumps(word, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"
