"""Preference pairs on the data path: every record shape the reader takes, bad records, `encode_pairs` (labels,
parity with the tokenizer's own chat template, truncation), pair rows and their batches, the dataset build, and the
check-custom-dataset / log-dataset commands on pairs."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import tunesmith.data.dataset as dataset_mod
import tunesmith.data.pairs as pairs_mod
from tunesmith.cli.main import main
from tunesmith.config import TrainConfig
from tunesmith.data.conversation import RecordError, SkipRecord, Turn
from tunesmith.data.dataset import build_train_dataset, build_validation_dataset, validate_data_names
from tunesmith.data.encode import IGNORE_INDEX, Encoded
from tunesmith.data.pack import (
    PAIR_ROW_FACTOR,
    PairDataset,
    collate,
    make_dataloader,
    pair_dataset,
    sequence_ids,
    shared_prefix,
)
from tunesmith.data.pairs import encode_pairs, preference_map_fn, rejected_conversation
from tunesmith.data.readers import MALFORMED, get_format, read_records
from tunesmith.data.render import tokenizer_info
from tunesmith.errors import TunesmithError


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ reading
HH_HEAD = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke."
EARLIER = Turn("Hi there", "Hello! How can I help?", output_with_loss=False)  # prompt side: never scored
SHAPES = {
    "trl explicit prompt text": (
        {"prompt": "Name the capital of Norway.", "chosen": "Oslo.", "rejected": "Bergen."},
        [Turn("Name the capital of Norway.", "Oslo.", rejected="Bergen.")]),
    "trl prompt messages with system, answer messages": (
        {"prompt": [{"role": "system", "content": "Be brief."}, user("Capital of Norway?")],
         "chosen": [bot("Oslo.")], "rejected": [bot("Bergen.")]},
        [Turn("Capital of Norway?", "Oslo.", "Be brief.", rejected="Bergen.")]),
    "trl prompt messages, text answers": (
        {"prompt": [{"role": "system", "content": "Be brief."}, user("Capital of Norway?")],
         "chosen": "Oslo.", "rejected": "Bergen."},
        [Turn("Capital of Norway?", "Oslo.", "Be brief.", rejected="Bergen.")]),
    "trl implicit prompt, multi-turn": (
        {"chosen": [user("Hi there"), bot("Hello! How can I help?"), user("Tell me a joke."), bot("A pun.")],
         "rejected": [user("Hi there"), bot("Hello! How can I help?"), user("Tell me a joke."), bot("No.")]},
        [EARLIER, Turn("Tell me a joke.", "A pun.", rejected="No.")]),
    "ultrafeedback binarized": (
        {"prompt": "Which planet is the largest?", "prompt_id": "0f3a9c",
         "chosen": [user("Which planet is the largest?"), bot("Jupiter.")],
         "rejected": [user("Which planet is the largest?"), bot("Mars.")],
         "messages": [user("Which planet is the largest?"), bot("Jupiter.")],
         "score_chosen": 9.0, "score_rejected": 3.5},
        [Turn("Which planet is the largest?", "Jupiter.", rejected="Mars.")]),
    "ultrafeedback, its prompt text ignored": (
        {"prompt": "some other wording", "prompt_id": "1",
         "chosen": [user("Which planet is the largest?"), bot("Jupiter.")],
         "rejected": [user("Which planet is the largest?"), bot("Mars.")],
         "messages": [user("Which planet is the largest?"), bot("Jupiter.")], "score_chosen": 8, "score_rejected": 2},
        [Turn("Which planet is the largest?", "Jupiter.", rejected="Mars.")]),
    "hh-rlhf multi-turn transcripts": (
        {"chosen": HH_HEAD + "\n\nAssistant: Why did the chicken cross the road?",
         "rejected": HH_HEAD + "\n\nAssistant: No."},
        [EARLIER, Turn("Tell me a joke.", "Why did the chicken cross the road?", rejected="No.")]),
    "hh-rlhf single turn, no leading blank line": (
        {"chosen": "Human: What is 2 + 2?\n\nAssistant: 4.", "rejected": "Human: What is 2 + 2?\n\nAssistant: 5."},
        [Turn("What is 2 + 2?", "4.", rejected="5.")]),
    "messages, the last assistant with chosen/rejected": (
        {"messages": [{"role": "system", "content": "Be brief."}, user("Hi there"), bot("Hello! How can I help?"),
                      user("Tell me a joke."), {"role": "assistant", "chosen": "A pun.", "rejected": "No."}]},
        [dataclasses.replace(EARLIER, system="Be brief."), Turn("Tell me a joke.", "A pun.", rejected="No.")]),
    "messages of the prompt, text chosen/rejected beside them": (
        {"messages": [user("Hi there"), bot("Hello! How can I help?"), user("Tell me a joke.")],
         "chosen": "A pun.", "rejected": "No."},
        [EARLIER, Turn("Tell me a joke.", "A pun.", rejected="No.")]),
    "xtuner conversation": (
        {"conversation": [{"system": "Be brief.", "input": "Hi there", "output": "Hello! How can I help?"},
                          {"input": "Tell me a joke.", "chosen": "A pun.", "rejected": "No."}]},
        [dataclasses.replace(EARLIER, system="Be brief."), Turn("Tell me a joke.", "A pun.", rejected="No.")]),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_shape_reads_into_the_pair(shape):
    record, expected = SHAPES[shape]
    turns = preference_map_fn(record)
    assert turns == expected
    assert all(not t.output_with_loss and t.rejected is None for t in turns[:-1])  # earlier answers: prompt only
    assert turns[-1].output_with_loss
    rejected = rejected_conversation(turns)
    assert rejected[:-1] == turns[:-1] and rejected[-1].output == turns[-1].rejected and rejected[-1].rejected is None
    # written back as XTuner conversation JSON (Turn.to_json: the last turn carries chosen / rejected) it reads alike
    as_json = [t.to_json() for t in turns]
    assert as_json[-1]["chosen"] == turns[-1].output and as_json[-1]["rejected"] == turns[-1].rejected
    assert "output" not in as_json[-1]
    assert preference_map_fn({"conversation": as_json}) == turns


@pytest.mark.parametrize("record,message", [
    ({"prompt": "q", "chosen": "a"}, "missing column 'rejected' (columns found: 'prompt', 'chosen')"),
    ({"messages": [user("q"), {"role": "assistant", "chosen": "a"}]},
     "missing column 'rejected' (columns found: 'role', 'chosen')"),
    ({"conversation": [{"input": "q", "chosen": "a"}]}, "the last turn needs 'chosen' and 'rejected'"),
    ({"chosen": [user("q"), bot("a")], "rejected": [user("another q"), bot("b")]},
     "'chosen' and 'rejected' must share the same messages before their last answer"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: other\n\nAssistant: b"},
     "'chosen' and 'rejected' must share the same messages before their last answer"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "empty or whitespace-only 'chosen'"),
    ({"chosen": [user("q"), bot("a")], "rejected": [user("q"), bot("")]}, "empty 'rejected' answer"),
    ({"conversation": [{"input": "q", "chosen": "a", "rejected": ""}]}, "empty or whitespace-only 'rejected'"),
    ({"prompt": "q", "chosen": "a", "rejected": [bot("b")]}, "must both be text or both be message lists"),
    ({"prompt": "q", "chosen": [bot("a")], "rejected": "b"}, "must both be text or both be message lists"),
    ({"chosen": "a", "rejected": "b"}, "without a 'prompt' must be HH-RLHF transcripts"),
    ({"chosen": [user("q")], "rejected": [user("q"), bot("b")]}, "'chosen' must end with an assistant message"),
    ({"chosen": [user("q"), {"role": "wizard", "content": "a"}], "rejected": [user("q"), bot("b")]},
     "'chosen' message 2: unknown role 'wizard'"),
    ({"prompt": [user("q"), bot("a")], "chosen": "b", "rejected": "c"}, "there is nothing to answer"),
    ({"prompt": [], "chosen": "b", "rejected": "c"}, "'prompt' must be a non-empty list"),
    (["not", "an", "object"], "expected a JSON object with 'chosen', 'rejected'"),
])
def test_bad_records_name_the_problem(record, message):
    with pytest.raises(RecordError) as exc:
        preference_map_fn(record)
    assert message in str(exc.value)


@pytest.mark.parametrize("record", [
    {"prompt": "q", "chosen": "same", "rejected": "same"},
    {"chosen": [user("q"), bot("same")], "rejected": [user("q"), bot("same")]},
    {"chosen": "\n\nHuman: q\n\nAssistant: same", "rejected": "\n\nHuman: q\n\nAssistant: same"},
    {"conversation": [{"input": "q", "chosen": "same", "rejected": "same"}]},
])
def test_the_same_answer_twice_is_skipped(record):
    with pytest.raises(SkipRecord, match="chosen and rejected are the same"):
        preference_map_fn(record)


# Known gaps of the reader, kept as executable reproducers (strict: they fail loudly once fixed)
def test_explicit_prompt_with_a_rejected_conversation_of_another_prompt_is_an_error():
    with pytest.raises(RecordError, match="must share the same messages"):
        preference_map_fn({"prompt": "q", "chosen": [bot("a")], "rejected": [user("another question"), bot("b")]})


def test_mixed_text_and_list_answers_without_prompt_name_the_mix():
    with pytest.raises(RecordError, match="must both be text or both be message lists"):
        preference_map_fn({"chosen": "a", "rejected": [user("q"), bot("b")]})


def test_read_records_skips_and_counts_bad_pairs_and_strict_stops_at_file_line(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        SHAPES["trl explicit prompt text"][0],
        {"prompt": "q", "chosen": "a"},
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        SHAPES["hh-rlhf multi-turn transcripts"][0],
        {"prompt": "q", "chosen": "b"},
        '{"prompt": oops}',
    ])
    records, stats = read_records(path, "preference")
    assert [len(r.turns) for r in records] == [1, 2] and [r.line for r in records] == [1, 4]
    assert stats.records_read == 6 and stats.conversations == 2 and stats.turns_histogram == {1: 1, 2: 1}
    reason = MALFORMED + "missing column 'rejected' (columns found: 'prompt', 'chosen')"
    assert stats.dropped[reason] == 2 and stats.malformed_at[reason] == [f"{path}:2", f"{path}:5"]
    assert stats.dropped["chosen and rejected are the same"] == 1 and stats.malformed == 3
    with pytest.raises(TunesmithError) as exc:
        read_records(path, "preference", strict=True)
    assert exc.value.message == f"{path}:2: missing column 'rejected' (columns found: 'prompt', 'chosen')"
    for alias in ("ultrafeedback", "hh_rlhf"):  # the aliases read the same
        assert get_format(alias).kind == "pairs"
        assert [r.turns for r in read_records(path, alias)[0]] == [r.turns for r in records]


# ------------------------------------------------------------------------------------------------ encoding
END = {"qwen2": "<|im_end|>", "llama": "<|im_end|>", "internlm": "<eoa>"}  # each fixture template's end of turn
PAIRS = [
    preference_map_fn({"prompt": "Hello world, please tell me five scenic spots.", "chosen": "The model learns.",
                       "rejected": "Data and code."}),
    preference_map_fn(SHAPES["xtuner conversation"][0]),
    preference_map_fn(SHAPES["hh-rlhf multi-turn transcripts"][0]),
]


@pytest.fixture(scope="module")
def toks(tiny_qwen2, tiny_llama, tiny_internlm):
    from tunesmith.models import load_tokenizer

    return {"qwen2": load_tokenizer(tiny_qwen2), "llama": load_tokenizer(tiny_llama),
            "internlm": load_tokenizer(tiny_internlm)}


def loss_text(tok, sample):
    return tok.decode([int(i) for i in sample.labels if i != IGNORE_INDEX])


def chat_messages(turns, answer):
    """The pair's conversation with `answer` last, as OpenAI-style messages (what apply_chat_template takes)."""
    out = [{"role": "system", "content": turns[0].system}] if turns[0].system else []
    for t in turns[:-1]:
        out += [user(t.input), bot(t.output)]
    return [*out, user(turns[-1].input), bot(answer)]


def first_label(sample):
    return int(np.flatnonzero(sample.labels != IGNORE_INDEX)[0])


@pytest.mark.parametrize("name", ["qwen2", "llama", "internlm"])
def test_auto_pairs_equal_apply_chat_template_and_score_only_the_last_answer(toks, name):
    tok = toks[name]
    samples, stats = encode_pairs(PAIRS, tok, "auto", max_length=512)
    assert len(samples) == 2 * len(PAIRS) and stats.samples == 2 * len(PAIRS)
    for k, turns in enumerate(PAIRS):
        chosen, rejected = samples[2 * k], samples[2 * k + 1]  # chosen at the even index, its rejected after it
        for sample, answer in ((chosen, turns[-1].output), (rejected, turns[-1].rejected)):
            ref = tok.apply_chat_template(chat_messages(turns, answer), tokenize=True)["input_ids"]
            assert sample.input_ids.tolist() == list(ref)
            assert loss_text(tok, sample) == answer + END[name]  # the last answer and its end of turn, nothing else
            # everything before the answer is the prompt: the generation prompt of the last turn, token for token
            prompt = tok.apply_chat_template(chat_messages(turns, answer)[:-1], add_generation_prompt=True,
                                             tokenize=True)["input_ids"]
            assert sample.input_ids[:first_label(sample)].tolist() == list(prompt)
        # the two sequences share their prompt token for token
        assert chosen.input_ids[:first_label(chosen)].tolist() == rejected.input_ids[:first_label(rejected)].tolist()
    assert stats.lengths == [len(s.input_ids) for s in samples]
    assert stats.tokens == sum(len(s.input_ids) for s in samples)
    assert stats.loss_tokens == sum(s.num_loss_tokens for s in samples)
    assert not stats.truncated and not stats.dropped


def test_named_template_pairs_score_only_the_last_answer(toks):
    tok = toks["internlm"]
    samples, _ = encode_pairs(PAIRS[1:2], tok, "internlm_chat", max_length=512)
    assert loss_text(tok, samples[0]) == "A pun.<eoa>" and loss_text(tok, samples[1]) == "No.<eoa>"
    text = tok.decode(samples[0].input_ids.tolist())
    assert "<|System|>:Be brief." in text and "Hello! How can I help?<eoa>" in text  # the earlier answer: prompt


def test_the_config_system_prompt_goes_into_both_sequences(toks):
    tok = toks["qwen2"]
    samples, _ = encode_pairs(PAIRS[:1], tok, "auto", max_length=512, system="Answer in French.")
    for s in samples:
        assert tok.decode(s.input_ids.tolist()).startswith("<|im_start|>system\nAnswer in French.<|im_end|>")


@pytest.mark.parametrize("name,template", [("qwen2", "auto"), ("llama", "chatml"), ("llama", "auto"),
                                           ("internlm", "internlm_chat")])
def test_tokenizer_without_offsets_encodes_pairs_the_same(toks, monkeypatch, name, template):
    tok = toks[name]
    fast, fast_stats = encode_pairs(PAIRS, tok, template, max_length=60)
    assert fast_stats.truncated and 0 < len(fast) < 2 * len(PAIRS) + 1  # cut ones among them
    slow_info = dataclasses.replace(tokenizer_info(tok), fast=False)
    monkeypatch.setattr(pairs_mod, "tokenizer_info", lambda t: slow_info)
    slow, slow_stats = encode_pairs(PAIRS, tok, template, max_length=60)
    assert [s.input_ids.tolist() for s in slow] == [s.input_ids.tolist() for s in fast]
    assert [s.labels.tolist() for s in slow] == [s.labels.tolist() for s in fast]
    assert slow_stats.as_dict() == fast_stats.as_dict() and slow_stats.lengths == fast_stats.lengths


def test_over_long_answers_are_cut_and_counted(toks):
    tok = toks["qwen2"]
    long_pair = preference_map_fn({"prompt": "Hello world", "chosen": "the model learns to answer " * 12,
                                   "rejected": "Data."})
    (full_c, full_r), _ = encode_pairs([long_pair], tok, "auto", max_length=1000)
    max_length = len(full_r.input_ids)  # the rejected sequence just fits
    assert len(full_c.input_ids) > max_length > first_label(full_c)
    (chosen, rejected), stats = encode_pairs([long_pair], tok, "auto", max_length=max_length)
    assert stats.truncated == {"answer_cut": 1} and stats.lengths == [len(full_c.input_ids), len(full_r.input_ids)]
    assert chosen.input_ids.tolist() == full_c.input_ids[:max_length].tolist()  # the prompt and the answer's start
    assert chosen.labels.tolist() == full_c.labels[:max_length].tolist()
    assert chosen.num_loss_tokens == max_length - first_label(full_c)
    assert loss_text(tok, chosen) and ("the model learns to answer " * 12).startswith(loss_text(tok, chosen))
    assert rejected.input_ids.tolist() == full_r.input_ids.tolist()  # the other sequence of the pair is untouched
    assert stats.samples == 2 and stats.tokens == max_length + len(full_r.input_ids)


def test_a_pair_whose_prompt_fills_max_length_is_dropped_and_counted(toks):
    tok = toks["qwen2"]
    short = PAIRS[0]
    long_prompt = preference_map_fn({"prompt": "please tell me " * 30, "chosen": "Yes.", "rejected": "No."})
    (s_c, s_r), _ = encode_pairs([short], tok, "auto", max_length=1000)
    (l_c, _), _ = encode_pairs([long_prompt], tok, "auto", max_length=1000)
    max_length = max(len(s_c.input_ids), len(s_r.input_ids))
    assert first_label(l_c) >= max_length  # no answer token of the long-prompt pair fits
    samples, stats = encode_pairs([long_prompt, short, long_prompt], tok, "auto", max_length=max_length)
    assert [s.input_ids.tolist() for s in samples] == [s_c.input_ids.tolist(), s_r.input_ids.tolist()]
    assert stats.dropped == {"no answer token left (prompt fills max_length)": 2}
    assert stats.samples == 2 and len(stats.lengths) == 6  # lengths: every sequence before truncation
    assert stats.truncated == {"answer_cut": 4}


def test_encode_pairs_without_an_eos_token_is_a_user_error_as_for_sft(tiny_qwen2):
    from tunesmith.data.encode import encode_records
    from tunesmith.models import load_tokenizer

    tok = load_tokenizer(tiny_qwen2)  # its own copy: the eos token is removed
    tok.eos_token = None
    with pytest.raises(TunesmithError, match="no eos_token"):
        encode_records([PAIRS[0][:1]], tok, "llama2_chat", max_length=64)
    with pytest.raises(TunesmithError, match="no eos_token"):
        encode_pairs(PAIRS[:1], tok, "llama2_chat", max_length=64)


def test_encode_pairs_needs_pairs(toks):
    with pytest.raises(ValueError, match="needs pairs"):
        encode_pairs([[Turn("q", "a")]], toks["qwen2"], "auto", max_length=64)


# ------------------------------------------------------------------------------------------------ rows, batches
def fake_pairs(lengths, seed=0):
    """Encoded samples of pairs: (chosen length, rejected length) each; token ids tell pair and side apart."""
    rng = np.random.default_rng(seed)
    out = []
    for k, pair in enumerate(lengths):
        for side, n in enumerate(pair):
            ids = np.full(n, 2 * k + side, dtype=np.int32)
            labels = ids.copy()
            labels[: max(1, int(rng.integers(1, n + 1)) - 1)] = IGNORE_INDEX
            out.append(Encoded(ids, labels))
    return out


def split_row(item):
    """The sequences of a row: where positions restart."""
    pos = item["position_ids"].numpy()
    starts = np.flatnonzero(pos == 0).tolist() + [len(pos)]
    return [item["input_ids"][a:b].numpy() for a, b in zip(starts, starts[1:], strict=False)]


@settings(max_examples=60, deadline=None)
@given(data=st.data(), max_length=st.integers(8, 40), seed=st.one_of(st.none(), st.integers(0, 3)))
def test_packed_rows_hold_whole_pairs_chosen_first_nothing_lost(data, max_length, seed):
    lengths = data.draw(st.lists(st.tuples(st.integers(1, max_length), st.integers(1, max_length)), min_size=1,
                                 max_size=30))
    samples = fake_pairs(lengths)
    ds = pair_dataset(samples, max_length, pack=True, seed=seed)
    assert ds.pairs and ds.packed and ds.num_pairs == len(lengths)
    seen = []
    for row in range(len(ds)):
        members = ds.bins[row]
        assert members[0::2] == [i - 1 for i in members[1::2]] and all(i % 2 == 0 for i in members[0::2])
        item = ds[row]
        assert len(item["input_ids"]) == ds.lengths[row] <= PAIR_ROW_FACTOR * max_length
        seqs = split_row(item)
        assert len(seqs) == len(members)
        for seq, idx in zip(seqs, members, strict=True):  # each sequence intact, chosen directly before rejected
            assert seq.tolist() == samples[idx].input_ids.tolist()
        seen += [i // 2 for i in members[0::2]]
    assert sorted(seen) == list(range(len(lengths)))  # every pair exactly once


def test_unpacked_rows_hold_one_pair_each():
    samples = fake_pairs([(5, 7), (3, 3), (9, 2)])
    ds = pair_dataset(samples, 16, pack=False, seed=3)
    assert len(ds) == 3 and ds.bins == [[0, 1], [2, 3], [4, 5]] and ds.lengths == [12, 6, 11]
    for k in range(3):
        item = ds[k]
        assert [s.tolist() for s in split_row(item)] == [samples[2 * k].input_ids.tolist(),
                                                         samples[2 * k + 1].input_ids.tolist()]
        assert item["labels"][len(samples[2 * k].input_ids)] == IGNORE_INDEX  # nothing predicted across the pair


def test_collate_pairs_sequence_ids_num_pairs_and_reference_logps():
    samples = fake_pairs([(4, 3), (2, 5), (3, 3), (6, 2)])
    ds = PairDataset(samples, [[0, 1, 2, 3], [6, 7], [4, 5]])
    ds.reference_logps = -np.arange(len(samples), dtype=np.float64) - 0.5  # sample i: -(i + 0.5)
    items = [ds[r] for r in range(3)]
    batch = collate(items, pad_token_id=0, packed=True, pad_to_multiple_of=8, pairs=True)
    sid = batch["sequence_ids"]
    assert sid.shape == batch["input_ids"].shape == (3, 16) and sid.dtype == torch.int64
    expected, s = [], 0
    for members in ds.bins:  # sequences counted row by row over the whole batch
        row = []
        for idx in members:
            row += [s] * len(samples[idx].input_ids)
            s += 1
        expected.append(row)
    for r, row in enumerate(expected):
        assert sid[r, :len(row)].tolist() == row and (sid[r, len(row):] == -1).all()
    assert batch["num_pairs"] == 4
    order = [i for members in ds.bins for i in members]  # the sample of each sequence id
    assert torch.equal(batch["reference_logps"], torch.tensor([-(i + 0.5) for i in order], dtype=torch.float32))
    assert "attention_mask" not in batch and batch["cu_seq_lens"].tolist()[-1] == 3 * 16
    for s, i in enumerate(order):  # each sequence id covers exactly that sample's tokens
        assert (batch["input_ids"][sid == s] == samples[i].input_ids[0]).all()
        assert int((sid == s).sum()) == len(samples[i].input_ids)
    plain = collate(items, pad_token_id=0, packed=True)
    assert "sequence_ids" not in plain and "reference_logps" not in plain


def test_sequence_ids_of_padded_rows():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1], [0, 1, 0, 0, 1, 2, 3]])
    assert sequence_ids(pos, [5, 3]).tolist() == [[0, 0, 0, 1, 1, -1, -1], [2, 2, 3, -1, -1, -1, -1]]


# ------------------------------------------------------------------------------------------------ dataset
def pair_rows(n=8):
    return [{"prompt": f"Question {i}: what is {i} + {i}?", "chosen": f"It is {2 * i}.",
             "rejected": f"It is {2 * i + 1}, I think."} for i in range(n)]


def pair_cfg(tmp_path, *, objective="dpo", model=None, **data):
    data = {"format": "preference", "prompt_template": "auto", "max_length": 64, "cache_dir": str(tmp_path / "cache"),
            **data}
    raw = {"method": "full", "data": data, "training": {"objective": objective}}
    if model is not None:
        raw["model"] = {"path": str(model)}
    return TrainConfig.model_validate(raw)


def test_build_train_dataset_on_pairs_counts_pairs_and_hits_the_cache(tmp_path, toks, monkeypatch):
    tok = toks["qwen2"]
    path = write_jsonl(tmp_path / "p.jsonl", [*pair_rows(), {"prompt": "q", "chosen": "x", "rejected": "x"}])
    cfg = pair_cfg(tmp_path, path=str(path))
    first, s1 = build_train_dataset(cfg, tok)
    assert isinstance(first, PairDataset) and first.num_pairs == 8 and first.pad_token_id == tok.pad_token_id
    assert s1.pairs == 8 and s1.samples == 16 and s1.conversations == 8 and not s1.cache_hit
    assert s1.dropped == {"chosen and rejected are the same": 1}
    assert "records read 9, conversations 8, pairs 8 (16 sequences), tokens" in s1.summary()
    assert sum(first.lengths) == s1.tokens - s1.shared_tokens and max(first.lengths) <= PAIR_ROW_FACTOR * 64
    assert s1.shared_tokens > 0 and "tokens held once" in s1.summary()
    assert s1.packed_sequences == len(first) and 0 <= s1.pad_fraction < 1

    def boom(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(dataset_mod, "encode_pairs", boom)
    monkeypatch.setattr(dataset_mod, "read_records", boom)
    second, s2 = build_train_dataset(cfg, tok)
    assert s2.cache_hit and s2.pairs == 8 and s2.tokens == s1.tokens and isinstance(second, PairDataset)
    assert [s.input_ids.tolist() for s in second.samples] == [s.input_ids.tolist() for s in first.samples]
    assert [s.labels.tolist() for s in second.samples] == [s.labels.tolist() for s in first.samples]
    assert second.bins == first.bins  # the same seed packs the same rows
    batches = list(make_dataloader(second, cfg, seed=0, epoch=0))
    assert sum(b["num_pairs"] for b in batches) == 8  # the loader batches pairs, none lost
    assert all(int((b["sequence_ids"] >= 0).sum()) == b["input_ids"].numel() for b in batches)  # one row: no pad


def test_unpacked_pairs_build_one_pair_a_row_with_the_config_system_prompt(tmp_path, toks):
    tok = toks["qwen2"]
    cfg = pair_cfg(tmp_path, path=str(write_jsonl(tmp_path / "p.jsonl", pair_rows(5))), pack_to_max_length=False,
                   system="Answer briefly.")
    ds, stats = build_train_dataset(cfg, tok)
    assert ds.bins == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert stats.packed_sequences == 0 and stats.pad_fraction == 0.0 and "packed into" not in stats.summary()
    for s in ds.samples:  # data.system reaches both sequences of every pair
        assert tok.decode(s.input_ids.tolist()).startswith("<|im_start|>system\nAnswer briefly.<|im_end|>")


def test_check_dataset_encodes_pairs_as_training_does(tmp_path, toks):
    from tunesmith.data.check import check_dataset

    tok = toks["qwen2"]
    path = write_jsonl(tmp_path / "p.jsonl", pair_rows(4))
    plain = check_dataset(pair_cfg(tmp_path, path=str(path), max_length=128), tok)
    cfg = pair_cfg(tmp_path, path=str(path), max_length=128, system="Answer briefly.")
    with_system = check_dataset(cfg, tok)
    assert plain.kind == "pairs" and plain.pairs == 4 and len(plain.lengths) == 8 and plain.ok
    assert not with_system.truncated and not with_system.dropped_after_encoding
    ds, _ = build_train_dataset(cfg, tok)
    assert with_system.lengths == [len(s.input_ids) for s in ds.samples]  # the training data's sequences
    extra = {b - a for a, b in zip(plain.lengths, with_system.lengths, strict=True)}
    assert len(extra) == 1 and extra.pop() > 0  # the system prompt is in every sequence


def test_validation_fraction_holds_out_whole_pairs(tmp_path, toks):
    tok = toks["qwen2"]
    cfg = pair_cfg(tmp_path, path=str(write_jsonl(tmp_path / "p.jsonl", pair_rows(8))), validation=0.25)
    train, t_stats = build_train_dataset(cfg, tok)
    val, v_stats = build_validation_dataset(cfg, tok)
    assert isinstance(val, PairDataset) and t_stats.pairs == 6 and v_stats.pairs == 2

    def chosen_texts(ds):
        return {tok.decode(s.input_ids.tolist()) for s in ds.samples[0::2]}

    assert not chosen_texts(train) & chosen_texts(val) and len(chosen_texts(train) | chosen_texts(val)) == 8
    for ds in (train, val):  # every held-out or kept pair keeps both its sequences
        for c, r in zip(ds.samples[0::2], ds.samples[1::2], strict=True):
            assert c.input_ids[:first_label(c)].tolist() == r.input_ids[:first_label(r)].tolist()


@pytest.mark.parametrize("objective,fmt,message,hint", [
    ("dpo", "oasst1", "training.objective dpo trains on preference pairs, but data.format 'oasst1' holds answers",
     "set data.format preference"),
    ("orpo", "conversation", "training.objective orpo trains on preference pairs, but data.format 'conversation'",
     "set data.format preference"),
    ("sft", "preference", "data.format 'preference' holds preference pairs, but training.objective is sft",
     "set training.objective dpo or orpo"),
    ("sft", "hh_rlhf", "data.format 'hh_rlhf' holds preference pairs", "set training.objective dpo or orpo"),
])
def test_objective_and_format_must_agree(tmp_path, objective, fmt, message, hint):
    cfg = pair_cfg(tmp_path, objective=objective, path="unused.jsonl", format=fmt)
    with pytest.raises(TunesmithError) as exc:
        validate_data_names(cfg)
    assert exc.value.message.startswith(message) and exc.value.hint.startswith(hint)
    validate_data_names(pair_cfg(tmp_path, objective="dpo", path="unused.jsonl", format="ultrafeedback"))


# ------------------------------------------------------------------------------------------------ commands
def run(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out = capsys.readouterr()
    return exc.value.code or 0, out.out, out.err


def config_file(tmp_path, model, **kw):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(pair_cfg(tmp_path, model=model, **kw).model_dump(mode="json")), encoding="utf-8")
    return path


def test_check_custom_dataset_reports_pairs_and_their_lengths(tmp_path, capsys, tiny_qwen2):
    data = write_jsonl(tmp_path / "p.jsonl", [*pair_rows(6), {"prompt": "please tell me " * 30, "chosen": "Yes.",
                                                                "rejected": "No."}])
    code, out, err = run(capsys, "check-custom-dataset", str(config_file(tmp_path, tiny_qwen2, path=str(data))))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"{data} (format preference): 7 records, 7 usable pairs"
    assert "turns per pair: 1: 7" in lines and "pairs after tokenizing: 6 (12 sequences)" in lines
    assert any(line.startswith("tokens per chosen sequence: min ") for line in lines)
    assert any(line.startswith("tokens per rejected sequence: min ") for line in lines)
    assert "tokens per sequence (chosen and rejected):" in lines
    assert "longer than max_length 64: chosen 1, rejected 1 (would be truncated: answer_cut: 2)" in lines
    assert "dropped after tokenizing: no answer token left (prompt fills max_length): 1" in lines
    assert lines[-1] == "OK"


def test_check_custom_dataset_lists_bad_pairs_with_lines(tmp_path, capsys, tiny_qwen2):
    data = write_jsonl(tmp_path / "p.jsonl", [
        pair_rows(1)[0],
        {"prompt": "q", "chosen": "a"},
        {"chosen": [user("q"), bot("a")], "rejected": [user("other"), bot("b")]},
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        '{"prompt": oops}',
        {"messages": [user("q")], "chosen": "a", "rejected": [bot("b")]},
    ])
    cfg = config_file(tmp_path, tiny_qwen2, path=str(data))
    code, out, _ = run(capsys, "check-custom-dataset", str(cfg))
    assert code == 2
    lines = out.splitlines()
    assert lines[0] == f"{data} (format preference): 6 records, 1 usable pairs"
    assert "dropped by the format: chosen and rejected are the same: 1" in lines and "4 problem(s):" in lines
    assert f"  {data}:2: missing column 'rejected' (columns found: 'prompt', 'chosen')" in lines
    assert f"  {data}:3: 'chosen' and 'rejected' must share the same messages before their last answer" in lines
    assert f"  {data}:5: malformed JSON (Expecting value at column 12)" in lines
    assert any(line.startswith(f"  {data}:6: ") for line in lines)
    assert "pairs after tokenizing: 1 (2 sequences)" in lines and lines[-1] == "NOT OK: fix the problems above"
    code, out, _ = run(capsys, "check-custom-dataset", str(cfg), "--no-tokenizer")
    assert code == 2 and f"  {data}:2: missing column 'rejected'" in out and "pairs after tokenizing" not in out


def test_check_custom_dataset_on_pairs_with_the_sft_objective_exits_2(tmp_path, capsys, tiny_qwen2):
    data = write_jsonl(tmp_path / "p.jsonl", pair_rows(2))
    cfg = config_file(tmp_path, tiny_qwen2, path=str(data), objective="sft")
    code, _, err = run(capsys, "check-custom-dataset", str(cfg))
    assert code == 2 and err.startswith("error: data.format 'preference' holds preference pairs, but "
                                        "training.objective is sft (hint: set training.objective dpo or orpo)")


SHARED_NOTE = r"(?:, the first (\d+) held once with the chosen)?"  # log-dataset's note on a shared prompt


def test_log_dataset_shows_each_sequence_of_a_pair(tmp_path, capsys, tiny_qwen2):
    data = write_jsonl(tmp_path / "p.jsonl", pair_rows(4))
    cfg = config_file(tmp_path, tiny_qwen2, path=str(data), pack_to_max_length=False)
    code, out, err = run(capsys, "log-dataset", str(cfg), "--show", "masked_text", "-n", "2")
    assert code == 0, err
    assert "pairs 4 (8 sequences)" in out.splitlines()[0] and "[input_ids]" not in out and "[text]" not in out
    rows = re.findall(r"^--- row (\d+) \((\d+) tokens, 1 pair\) ---$", out, re.M)
    assert [r[0] for r in rows] == ["0", "1"]  # unpacked: row k is pair k
    for k in (0, 1):
        row = pair_rows(4)[k]
        sizes = []
        for side in ("chosen", "rejected"):
            found = re.search(rf"^-- pair {k} {side} \((\d+) tokens{SHARED_NOTE}\) --\n\[masked_text\]\n(.*)$", out,
                              re.M)
            assert found is not None, (k, side, out)
            # each sequence shown whole (a shared prompt too): the prompt masked as for SFT, the answer and its end
            # of turn shown, the "\n" after it masked
            assert re.fullmatch(rf"\[masked: \d+\]{re.escape(row[side])}<\|im_end\|>\[masked: 1\]", found.group(3))
            sizes.append(int(found.group(1)) - int(found.group(2) or 0))
        assert sum(sizes) == int(rows[k][1])  # the row holds the shared prompt once
    code, out, _ = run(capsys, "log-dataset", str(cfg), "--show", "all", "-n", "1")
    assert code == 0 and "-- pair 1 chosen" not in out
    text = out.split("-- pair 0 chosen", 1)[1].split("-- pair 0 rejected", 1)
    assert all(part.count(f"[{view}]") == 1 for part in text for view in ("text", "masked_text", "input_ids",
                                                                            "labels"))
    assert "<|im_start|>user\nQuestion 0: what is 0 + 0?<|im_end|>" in text[0] and "It is 0.<|im_end|>" in text[0]
    assert "It is 1, I think.<|im_end|>" in text[1] and "[labels]\n[-100, " in text[1]


def test_log_dataset_splits_packed_rows_into_their_pairs(tmp_path, capsys, tiny_qwen2):
    data = write_jsonl(tmp_path / "p.jsonl", pair_rows(8))
    cfg = config_file(tmp_path, tiny_qwen2, path=str(data), max_length=128)
    code, out, err = run(capsys, "log-dataset", str(cfg), "--show", "text", "-n", "2")
    assert code == 0, err
    rows = re.findall(r"^--- packed row (\d+) \((\d+) tokens, (\d+) pairs?\) ---$", out, re.M)
    assert [r[0] for r in rows] == ["0", "1"] and all(int(r[1]) <= 256 and int(r[2]) >= 2 for r in rows)
    found = re.findall(rf"^-- pair (\d+) (chosen|rejected) \(\d+ tokens{SHARED_NOTE}\) --$", out, re.M)
    labels = [(k, side) for k, side, _ in found]
    assert len(labels) == 2 * sum(int(r[2]) for r in rows)
    for (k1, side1), (k2, side2) in zip(labels[0::2], labels[1::2], strict=True):  # chosen, then its rejected
        assert (side1, side2) == ("chosen", "rejected") and k1 == k2
    assert len({k for k, _ in labels}) == len(labels) // 2


def _encoded(ids, scored_from):
    ids = np.asarray(ids, dtype=np.int32)
    labels = ids.copy()
    labels[:scored_from] = IGNORE_INDEX
    return Encoded(ids, labels)


def test_shared_prefix_stops_short_of_the_first_scored_token_and_of_the_common_end():
    # answers that begin alike (token 7) still score that token in both: the prefix ends before the prompt's last
    assert shared_prefix(_encoded([1, 2, 3, 7, 8], 3), _encoded([1, 2, 3, 7, 9, 9], 3)) == 2
    assert shared_prefix(_encoded([1, 2, 5, 7], 3), _encoded([1, 2, 6, 7], 3)) == 1  # prompts differ at token 2
    assert shared_prefix(_encoded([4, 2, 3], 1), _encoded([5, 2, 3], 1)) == 0
    assert shared_prefix(_encoded([1, 2, 3], 1), _encoded([1, 9], 1)) == 0  # one prompt token: nothing to hold once


def test_a_shared_row_holds_each_sequence_once_with_its_positions_labels_and_keys():
    chosen, rejected = _encoded([1, 2, 3, 4, 7, 8], 4), _encoded([1, 2, 3, 4, 9], 4)
    other_c, other_r = _encoded([5, 6, 7], 2), _encoded([6, 6], 1)
    ds = pair_dataset([chosen, rejected, other_c, other_r], 8, pack=True, seed=None, share_prompt=True)
    assert ds.shared == [3, 0] and ds.lengths == [6 + 2 + 3 + 2]
    item = ds[0]
    members = ds.bins[0]
    assert members[:2] == [0, 1]  # best-fit decreasing: the longer pair first
    assert item["input_ids"][:8].tolist() == [1, 2, 3, 4, 7, 8, 4, 9]  # the rejected rest: its prompt's last, answer
    assert item["position_ids"][:8].tolist() == [0, 1, 2, 3, 4, 5, 3, 4]
    assert item["labels"][:8].tolist() == [IGNORE_INDEX] * 4 + [7, 8, IGNORE_INDEX, 9]
    assert item["sequence_index"].tolist() == [0] * 6 + [1] * 2 + [2] * 3 + [3] * 2
    assert item["q_lengths"].tolist() == [6, 2, 3, 2] and item["k_lengths"].tolist() == [6, 5, 3, 2]
    assert item["kv_index"].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 6, 7, 8, 9, 10, 11, 12]
    assert int(item["num_tokens"]) == 6 + 5 + 3 + 2
    batch = collate([item, ds[0]], 0, True, pairs=True)  # two rows, no padding: offsets by row
    assert batch["cu_seq_lens"].tolist() == [0, 6, 8, 11, 13, 19, 21, 24, 26]
    assert batch["cu_seq_lens_k"].tolist() == [0, 6, 11, 14, 16, 22, 27, 30, 32]
    assert batch["kv_index"][16:19].tolist() == [13, 14, 15] and batch["num_pairs"] == 4
    assert batch["sequence_ids"][1].tolist() == [4] * 6 + [5] * 2 + [6] * 3 + [7] * 2


def test_prompts_are_shared_only_where_the_packed_attention_reads_them(tiny_qwen2, tmp_path):
    base = {"model": {"path": str(tiny_qwen2)}, "data": {"path": "x.jsonl", "format": "preference"},
            "training": {"objective": "dpo"}, "method": "lora"}
    assert TrainConfig.model_validate(base).shares_prompt()
    for override in ({"speed": {"packed_attention": False}}, {"preference": {"share_prompt": False}},
                     {"model": {"path": str(tiny_qwen2), "attn_implementation": "eager"}}):
        assert not TrainConfig.model_validate({**base, **override}).shares_prompt(), override
