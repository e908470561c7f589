"""Encoding: ids equal to the tokenizer's own chat template, loss masks, BOS/EOS rules, truncation."""

from __future__ import annotations

import numpy as np
import pytest

from tests.data.datahelp import messages
from tunesmith.data.conversation import Turn
from tunesmith.data.encode import (
    IGNORE_INDEX,
    encode_conversation,
    encode_prompt,
    encode_records,
)
from tunesmith.data.render import render_conversation, render_prompt_text, tokenizer_info
from tunesmith.data.stopwords import cut_at_stop, stop_words_for

SMOL_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
TURNS = [Turn("Hi there", "Hello! How can I help?"), Turn("Tell me a joke.", "Why did the chicken cross the road?")]


def loss_text(tok, sample):
    return tok.decode([int(i) for i in sample.labels if i != IGNORE_INDEX])


@pytest.mark.parametrize("system", ["", "You are terse."])
@pytest.mark.parametrize("n_turns", [1, 2])
def test_smollm2_auto_equals_apply_chat_template(smol_tok, system, n_turns):
    turns = TURNS[:n_turns]
    ref_text = smol_tok.apply_chat_template(messages(turns, system), tokenize=False)
    ref_ids = smol_tok.apply_chat_template(messages(turns, system), tokenize=True)["input_ids"]
    assert render_conversation(turns, smol_tok, "auto", system=system).text == ref_text
    sample = encode_conversation(turns, smol_tok, "auto", system=system)
    assert sample.input_ids.tolist() == list(ref_ids)
    # loss exactly on the replies and their <|im_end|>; the "\n" after it (SEP) and all prompts masked
    assert loss_text(smol_tok, sample) == "".join(t.output + "<|im_end|>" for t in turns)
    if not system:
        assert SMOL_DEFAULT_SYSTEM in ref_text  # the template's own default system prompt is kept
    prompt_turns = [*turns, Turn("And another?", "")]
    ref_prompt = smol_tok.apply_chat_template(messages(prompt_turns, system), tokenize=False,
                                              add_generation_prompt=True)
    assert render_prompt_text(smol_tok, "auto", prompt_turns, system=system) == ref_prompt
    assert encode_prompt(smol_tok, "auto", prompt_turns, system=system) == list(
        smol_tok.apply_chat_template(messages(prompt_turns, system), add_generation_prompt=True)["input_ids"])


@pytest.mark.parametrize("name", ["chatml", "qwen_chat", "internlm2_chat"])
@pytest.mark.parametrize("system", ["", "You are terse."])
@pytest.mark.parametrize("n_turns", [1, 2])
def test_smollm2_named_chatml_equals_apply_chat_template(smol_tok, name, system, n_turns):
    """A named template of the model's own layout is token-identical to its chat template, including the
    default system prompt SmolLM2 injects when there is none."""
    turns = TURNS[:n_turns]
    sample = encode_conversation(turns, smol_tok, name, system=system)
    assert render_conversation(turns, smol_tok, name, system=system).text == smol_tok.apply_chat_template(
        messages(turns, system), tokenize=False)
    assert sample.input_ids.tolist() == list(smol_tok.apply_chat_template(messages(turns, system))["input_ids"])
    assert loss_text(smol_tok, sample) == "".join(t.output + "<|im_end|>" for t in turns)
    prompt_turns = [*turns, Turn("And another?", "")]
    assert render_prompt_text(smol_tok, name, prompt_turns, system=system) == smol_tok.apply_chat_template(
        messages(prompt_turns, system), tokenize=False, add_generation_prompt=True)
    assert encode_prompt(smol_tok, name, prompt_turns, system=system) == list(smol_tok.apply_chat_template(
        messages(prompt_turns, system), add_generation_prompt=True)["input_ids"])


def test_default_system_is_adopted_only_by_a_matching_layout(smol_tok, qwen_tok):
    from tunesmith.data.render import tokenizer_default_system
    from tunesmith.data.templates import get_template

    assert tokenizer_default_system(smol_tok, get_template("chatml")) == SMOL_DEFAULT_SYSTEM
    assert tokenizer_default_system(smol_tok, get_template("internlm_chat")) == ""
    text = render_conversation(TURNS[:1], smol_tok, "internlm_chat").text
    assert text == "<|User|>:Hi there<eoh>\n<|Bot|>:Hello! How can I help?<eoa>\n"  # XTuner: no system, no block
    assert tokenizer_default_system(qwen_tok, get_template("qwen_chat")) == ""  # no chat template to compare
    assert get_template("chatml").render(TURNS[:1]).startswith("<|im_start|>user")  # the bare renderer: as given


def test_smollm2_pad_equals_eos_and_the_end_of_turn_is_still_learned(smol_tok):
    assert smol_tok.pad_token_id == smol_tok.eos_token_id == smol_tok.convert_tokens_to_ids("<|im_end|>")
    sample = encode_conversation(TURNS[:1], smol_tok, "chatml", system="S")
    end = smol_tok.convert_tokens_to_ids("<|im_end|>")
    eot_positions = np.flatnonzero(sample.input_ids == end)
    assert sample.labels[eot_positions[-1]] == end  # the reply's <|im_end|> has loss
    assert all(sample.labels[p] == IGNORE_INDEX for p in eot_positions[:-1])  # system / user ones do not
    assert tokenizer_info(smol_tok).bos_text == ""  # SmolLM2 does not prepend <|im_start|> as BOS


def test_qwen_special_ids_and_masks(qwen_tok):
    turns = [Turn("你好", "你好！有什么可以帮你？", "You are helpful."), Turn("1+1?", "2")]
    sample = encode_conversation(turns, qwen_tok, "qwen_chat")
    ids, labels = sample.input_ids.tolist(), sample.labels.tolist()
    assert ids[0] == 151644 and ids.count(151644) == 5 and ids.count(151645) == 5  # single ids, no BOS
    assert qwen_tok.convert_ids_to_tokens([151644, 151645]) == ["<|im_start|>", "<|im_end|>"]
    assert tokenizer_info(qwen_tok).bos_text == ""
    im_end = [i for i, t in enumerate(ids) if t == 151645]
    labelled = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
    assert [i for i in im_end if labels[i] == 151645] == [im_end[2], im_end[4]]  # the replies' <|im_end|> only
    assert qwen_tok.decode([ids[i] for i in labelled]) == "你好！有什么可以帮你？<|im_end|>2<|im_end|>"
    assert labels[im_end[2] + 1] == IGNORE_INDEX and ids[im_end[2] + 1] == 198  # SEP "\n" masked
    assert stop_words_for("qwen_chat", qwen_tok) == ["<|im_end|>", "<|endoftext|>"]


def test_bos_per_turn_only_after_eos_xtuner_0_1_23(bos_tok):
    turns = [Turn("Hello there", "I am fine"), Turn("how are you", "thank you")]
    sample = encode_conversation(turns, bos_tok, "default")
    ids, labels = sample.input_ids.tolist(), sample.labels.tolist()
    bos, eos = bos_tok.bos_token_id, bos_tok.eos_token_id
    assert ids[0] == bos and ids.count(bos) == 2 and ids.count(eos) == 2
    assert [labels[i] for i, t in enumerate(ids) if t in (bos, eos)] == [IGNORE_INDEX, eos, IGNORE_INDEX, eos]
    assert bos_tok.decode([x for x in labels if x != IGNORE_INDEX]) == "I am fine</s>thank you</s>"
    # with SUFFIX_AS_EOS (internlm_chat) only the first turn has BOS and no EOS is added
    sample2 = encode_conversation(turns, bos_tok, "internlm_chat")
    assert sample2.input_ids.tolist().count(bos) == 1 and eos not in sample2.input_ids.tolist()
    # chat prompts render the same BOS/EOS/SEP as training
    assert render_prompt_text(bos_tok, "default", [*turns, Turn("bye", "")]) == (
        "<s><|User|>:Hello there\n<|Bot|>:I am fine</s>\n<s><|User|>:how are you\n<|Bot|>:thank you</s>\n"
        "<s><|User|>:bye\n<|Bot|>:")


def test_output_with_loss_false_masks_that_reply(smol_tok):
    turns = [Turn("a", "not learned", output_with_loss=False), Turn("b", "learned")]
    sample = encode_conversation(turns, smol_tok, "chatml", system="S")
    assert loss_text(smol_tok, sample) == "learned<|im_end|>"


def test_truncation_at_turn_boundary_and_inside_a_turn_is_counted(smol_tok):
    long_turns = [Turn("q1", "short answer"), Turn("q2", "word " * 300)]
    samples, stats = encode_records([long_turns], smol_tok, "chatml", max_length=64)
    assert stats.truncated == {"at_turn_boundary": 1} and len(samples[0].input_ids) <= 64
    assert loss_text(smol_tok, samples[0]) == "short answer<|im_end|>"
    one = [[Turn("q", "word " * 300)]]
    samples, stats = encode_records(one, smol_tok, "chatml", max_length=64)
    assert stats.truncated == {"inside_turn": 1} and len(samples[0].input_ids) == 64
    prompt_only = [[Turn("word " * 300, "a")]]
    samples, stats = encode_records(prompt_only, smol_tok, "chatml", max_length=64)
    assert samples == [] and stats.dropped == {"no loss tokens (prompt fills max_length)": 1}
    assert stats.lengths[0] > 300


def test_pretrain_text_is_split_not_cut(bos_tok):
    text = "The quick brown fox jumps over the lazy dog. " * 20
    samples, stats = encode_records([[Turn("", text)]], bos_tok, "default", max_length=50, kind="text")
    joined = np.concatenate([s.input_ids for s in samples]).tolist()
    assert joined == bos_tok(text, add_special_tokens=True)["input_ids"] + [bos_tok.eos_token_id]
    assert stats.truncated == {"split_document": 1} and all(len(s.input_ids) <= 50 for s in samples)
    assert samples[0].labels[0] == IGNORE_INDEX and samples[-1].labels[-1] == bos_tok.eos_token_id


@pytest.mark.parametrize("name,template", [("smollm2", "chatml"), ("internlm", "internlm_chat")])
def test_tokenizer_without_offsets_encodes_the_same(smol_tok, tiny_internlm, monkeypatch, name, template):
    """The path for tokenizers without offsets gives the ids and labels of the offsets path, sentencepiece (a dummy
    prefix, which a piece-by-piece tokenization would repeat at every piece) included."""
    import dataclasses

    import tunesmith.data.encode as enc
    from tunesmith.models import load_tokenizer

    tok = smol_tok if name == "smollm2" else load_tokenizer(tiny_internlm)
    turns = [Turn("Hi", "Hello there!", "Sys"), Turn("More?", "Sure thing.")]
    fast = encode_conversation(turns, tok, template)
    slow_info = dataclasses.replace(tokenizer_info(tok), fast=False)
    monkeypatch.setattr(enc, "tokenizer_info", lambda tok: slow_info)
    slow = encode_conversation(turns, tok, template)
    assert slow.input_ids.tolist() == fast.input_ids.tolist() and slow.labels.tolist() == fast.labels.tolist()
    assert "thing." in loss_text(tok, slow) and "More?" not in loss_text(tok, slow)


def test_every_builtin_recipe_names_a_known_format_and_template():
    from tunesmith.config import build_recipe, recipe_names
    from tunesmith.data.dataset import validate_data_names

    for name in recipe_names():
        validate_data_names(build_recipe(name))


def test_auto_template_errors_are_user_errors(smol_tok):
    import copy

    from tunesmith.errors import TunesmithError

    tok = copy.deepcopy(smol_tok)
    tok.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}x"
    with pytest.raises(TunesmithError, match="rejected a conversation .*no system role"):
        encode_conversation([Turn("a", "b", "sys")], tok, "auto")
    tok.chat_template = None
    with pytest.raises(TunesmithError, match="has no chat template"):
        encode_conversation([Turn("a", "b")], tok, "auto")


def test_auto_with_a_template_that_rewrites_replies(smol_tok):
    """A Qwen3-style template (an empty think block before each reply, content trimmed): the loss still
    falls on the reply and its <|im_end|>, never on the same words in the user message."""
    import copy

    tok = copy.deepcopy(smol_tok)
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}<think>\n\n</think>\n\n"
        "{{ m.content | trim }}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    turns = [Turn("say hello", " hello "), Turn("again: hello", "hello")]
    sample = encode_conversation(turns, tok, "auto")
    assert loss_text(tok, sample) == "hello<|im_end|>hello<|im_end|>"
    assert sample.input_ids.tolist() == list(tok.apply_chat_template(messages(turns))["input_ids"])


def test_cut_at_stop_is_where_the_streaming_matcher_stops():
    from tunesmith.infer.stops import StopHit, StopMatcher

    words = ["<eoa>", "<|im_end|>", "###"]
    for text in ["plain answer", "answer<eoa> tail", "a ### b <eoa>", "x<|im_end|>y###", "<eoa>"]:
        hit = StopMatcher(words).feed(text)
        streamed = hit.text if isinstance(hit, StopHit) else text
        assert cut_at_stop(text, words) == streamed


def _python_only_tokenizer():
    """A character-level tokenizer on transformers' Python backend (like a remote-code sentencepiece one): it
    returns no offsets, and transformers 5 ignores ``return_offsets_mapping`` instead of refusing it."""
    from transformers import PreTrainedTokenizer

    class CharTokenizer(PreTrainedTokenizer):
        def __init__(self, **kwargs):
            chars = ["<unk>", "<s>", "</s>", "\n", *(chr(c) for c in range(32, 127))]
            self.vocab = {c: i for i, c in enumerate(chars)}
            super().__init__(unk_token="<unk>", bos_token="<s>", eos_token="</s>", **kwargs)

        @property
        def vocab_size(self):
            return len(self.vocab)

        def get_vocab(self):
            return dict(self.vocab)

        def _tokenize(self, text):
            return list(text)

        def _convert_token_to_id(self, token):
            return self.vocab.get(token, 0)

        def _convert_id_to_token(self, index):
            return next((c for c, i in self.vocab.items() if i == index), "<unk>")

        def convert_tokens_to_string(self, tokens):
            return "".join(tokens)

    return CharTokenizer()


def test_a_python_only_tokenizer_takes_the_path_without_offsets():
    tok = _python_only_tokenizer()
    assert "offset_mapping" not in tok("a", return_offsets_mapping=True)  # ignored, not refused
    assert tokenizer_info(tok).fast is False
    sample = encode_conversation(TURNS, tok, "chatml")
    assert sample.input_ids.tolist() == tok(render_conversation(TURNS, tok, "chatml").text,
                                            add_special_tokens=False)["input_ids"]
    assert loss_text(tok, sample) == "".join(f"{t.output}<|im_end|>" for t in TURNS)  # the newline after is not trained


def test_a_token_across_the_reply_start_is_prompt_on_both_paths(tiny_qwen2, monkeypatch):
    """deepseek_v2's prompt ends in "Assistant: " and a reply "s are" starts inside the merged token " s": with
    offsets that token starts in the prompt and carries no loss; the path without offsets must agree."""
    import dataclasses

    import tunesmith.data.encode as enc
    from tunesmith.models import load_tokenizer

    tok = load_tokenizer(tiny_qwen2)
    turns = [Turn("Hi", "s are"), Turn("Hello there", "s are")]
    rendered = render_conversation(turns, tok, "deepseek_v2")
    offsets = tok(rendered.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert any(s < a < e for a, _ in rendered.spans for s, e in offsets)  # the case this test is about
    fast = encode_conversation(turns, tok, "deepseek_v2")
    slow_info = dataclasses.replace(tokenizer_info(tok), fast=False)
    monkeypatch.setattr(enc, "tokenizer_info", lambda t: slow_info)
    slow = encode_conversation(turns, tok, "deepseek_v2")
    assert slow.input_ids.tolist() == fast.input_ids.tolist() and slow.labels.tolist() == fast.labels.tolist()
