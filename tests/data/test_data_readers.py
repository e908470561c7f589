"""Readers: every format, real shared files, and the errors bad input gets (file + line)."""

from __future__ import annotations

import json

import pytest

from tests.data.datahelp import FILES, shared_file
from tunesmith.data.conversation import Turn
from tunesmith.data.msagent import msagent_react_map_fn
from tunesmith.data.readers import (
    check_records,
    format_names,
    get_format,
    oasst1_map_fn,
    openai_map_fn,
    read_records,
)
from tunesmith.data.sources import iter_raw
from tunesmith.errors import TunesmithError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_format_registry_has_the_recipe_names():
    assert {"oasst1", "alpaca", "alpaca_zh", "code_alpaca", "medical", "conversation", "msagent_react", "openai",
            "sharegpt", "pretrain"} <= set(format_names())
    with pytest.raises(TunesmithError) as exc:
        get_format("oasst")
    assert "unknown dataset format 'oasst'" in exc.value.message and "oasst1" in exc.value.hint


def test_oasst1_real_file_turn_counts():
    records, stats = read_records(shared_file("oasst1/openassistant_best_replies_eval.jsonl"), "oasst1")
    assert stats.records_read == 518 and len(records) == 518
    assert dict(stats.turns_histogram) == {1: 342, 2: 167, 3: 9}
    assert records[0].where.endswith("openassistant_best_replies_eval.jsonl:1") and records[0].line == 1


def test_oasst1_heading_inside_a_reply_cuts_it_as_xtuner_and_dangling_human():
    text = ("### Human: Write a README### Assistant: Sure:\n### Usage\nRun it.### Human: Thanks"
            "### Assistant: You're welcome.### Human: one more?")
    assert oasst1_map_fn({"text": text}) == [Turn("Write a README", "Sure:"),
                                             Turn("Thanks", "You're welcome.")]


def test_conversation_json_array_inside_jsonl(tmp_path):
    records, _ = read_records(FILES / "array_saved_as.jsonl", "conversation")
    assert [len(r.turns) for r in records] == [1, 2] and [r.line for r in records] == [2, 3]
    assert records[1].turns[0] == Turn("Why?", "Because.", "Be brief.")


def test_toy_xtuner_files():
    for name, turns in [("toy_custom_single_turn_data.json", [1, 1]), ("toy_custom_multi_turn_data.json", [3, 3]),
                        ("toy_custom_incremental_data.json", [1, 1])]:
        records, _ = read_records(shared_file(f"formats/xtuner_conversation/{name}"), "conversation")
        assert [len(r.turns) for r in records] == turns


def test_alpaca_input_and_nooutput(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Add", "input": "1 and 2", "output": "3"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"instruction": "Nothing", "input": "", "output": "<nooutput>"}])
    records, stats = read_records(path, "alpaca")
    assert [r.turns[0] for r in records] == [Turn("Add\n1 and 2", "3"), Turn("Say hi\n", "hi")]
    assert stats.dropped == {"alpaca <nooutput>": 1}
    real, _ = read_records(shared_file("formats/alpaca/alpaca_en_demo.json"), "alpaca")
    assert len(real) == 999 and all(r.turns[0].input.endswith("\n") or "\n" in r.turns[0].input for r in real)


def test_alpaca_zh_medical_code_alpaca(tmp_path):
    zh = write_jsonl(tmp_path / "zh.jsonl", [{"instruction_zh": "问", "input_zh": "", "output_zh": "答"}])
    assert read_records(zh, "alpaca_zh")[0][0].turns == (Turn("问\n", "答"),)
    med = write_jsonl(tmp_path / "m.jsonl", [{"instruction": "头疼", "input": "", "output": "休息"}])
    assert read_records(med, "medical")[0][0].turns[0].system == "如果你是一名医生，请根据患者的描述回答医学问题。\n"
    code = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "sort", "completion": "sorted(x)"}])
    assert read_records(code, "code_alpaca")[0][0].turns[0].system.startswith("You are a professional programer.")


def test_openai_messages_bare_lists_roles_and_loss():
    rec = {"messages": [{"role": "assistant", "content": "skipped"}, {"role": "system", "content": "S"},
                        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "calc", "loss": False},
                        {"role": "tool", "content": "4"}, {"role": "assistant", "content": "4", "loss": "true"},
                        {"role": "user", "content": "unanswered"}]}
    assert openai_map_fn(rec) == [Turn("2+2?", "calc", "S", False), Turn("4", "4")]
    records, _ = read_records(shared_file("formats/openai_messages/xtuner_tests_openai_sft.jsonl"), "openai")
    assert len(records) == 128 and records[0].turns[0].input.startswith("Give three tips")


def test_openai_toy_file_bad_row_is_reported_with_its_line():
    path = shared_file("formats/openai_messages/toy_chat_fine_tuning.jsonl")
    with pytest.raises(TunesmithError) as exc:
        read_records(path, "openai", strict=True)
    assert exc.value.message.endswith("toy_chat_fine_tuning.jsonl:4: no user message answered by an assistant "
                                      "message")
    records, stats = read_records(path, "openai")  # by default: skipped, counted, located
    reason = "malformed: no user message answered by an assistant message"
    assert len(records) == 4 and stats.dropped[reason] == 1 and stats.malformed == 1
    assert [w.rsplit(":", 1)[1] for w in stats.malformed_at[reason]] == ["4"]
    records, stats, problems = check_records(path, "openai")
    assert len(records) == 4 and [p.where.rsplit(":", 1)[1] for p in problems] == ["4"]


def test_sharegpt_with_tools():
    records, stats = read_records(shared_file("agent/glaive_toolcall_en_demo.json"), "sharegpt")
    assert len(records) == 300
    first = records[0].turns
    assert first[0].system.startswith("Tools: ") and first[1].output.startswith('{"name": "search_recipes"')
    assert first[2].input.startswith('{"recipes"')  # the observation is prompt text of the next turn


def test_msagent_both_forms_real_rows():
    records, _ = read_records(shared_file("agent/msagent_bench_doc_examples.jsonl"), "msagent_react")
    think, react = records[0].turns, records[1].turns
    assert think[0].system.startswith("你是一个可以调用外部工具的助手")
    assert think[0].output.startswith("Action:modelscope_text-ie\nAction Input:{'text':")
    assert think[1].system.startswith("Response:{'人物': []")
    assert think[1].output.startswith("Final Answer:信息抽取结果")
    assert len(react) == 6 and react[0].system.startswith("Answer the following questions")
    assert react[0].output == "Action: hm_product_recommend\nAction Input: {'keywords_dict': {'商品类目': '手机'}}\n"
    assert react[1].system.startswith("Observation: [{'sku_code'") and react[1].input == ""
    assert react[1].output.startswith("Thought: I now know the final answer\nFinal Answer: 您好")
    assert all("Observation:" not in t.output for t in react)  # tool results never carry loss


def test_msagent_string_conversations_parse_without_eval():
    conv = json.dumps([{"from": "user", "value": "hi"}, {"from": "assistant", "value": "hello"}])
    assert msagent_react_map_fn({"conversations": conv}) == [Turn("hi\n", "hello\n")]


def test_pretrain_txt_lines(tmp_path):
    (tmp_path / "corpus.txt").write_text("first doc\n\n  second doc  \n", encoding="utf-8")
    records, _ = read_records(tmp_path / "corpus.txt", "pretrain")
    assert [r.turns[0].output for r in records] == ["first doc", "second doc"] and records[1].line == 3
    assert get_format("pretrain").kind == "text"


def test_folder_picks_the_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "### Human: a### Assistant: b"}])
    write_jsonl(tmp_path / "test.jsonl", [{"text": "### Human: c### Assistant: d"}] * 2)
    assert len(read_records(tmp_path, "oasst1", split="train")[0]) == 1
    assert len(read_records(tmp_path, "oasst1", split="test")[0]) == 2


def test_csv_parquet_xlsx_rows(tmp_path):
    import pandas as pd

    rows = list(iter_raw(FILES / "qa.csv"))
    assert [r.line for r in rows] == [2, 3, 5, 6] and rows[1].data["Answer"].startswith("An NSAID")
    frame = pd.DataFrame({"input": ["a", "b"], "output": ["x", "y"]})
    frame.to_parquet(tmp_path / "d.parquet")
    frame.to_excel(tmp_path / "d.xlsx", index=False)
    assert read_records(tmp_path / "d.parquet", "default")[0][1].turns == (Turn("b", "y"),)
    xl = read_records(tmp_path / "d.xlsx", "default")[0]
    assert xl[0].where.endswith("d.xlsx row 2") and xl[1].turns == (Turn("b", "y"),)


# ---------------------------------------------------------------- bad input
def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"conversation": [{"input": "a", "output": "b"}]}\n\n{"conversation": [}\n', encoding="utf-8")
    with pytest.raises(TunesmithError) as exc:
        read_records(path, "conversation", strict=True)
    assert exc.value.message.startswith(f"{path}:3: malformed JSON")
    records, stats = read_records(path, "conversation")  # by default a bad line is one more skipped record
    reason = "malformed: malformed JSON (Expecting value at column N)"
    assert len(records) == 1 and stats.dropped == {reason: 1} and stats.malformed_at == {reason: [f"{path}:3"]}
    _, _, problems = check_records(path, "conversation")
    assert [(p.where, p.message) for p in problems] == [(f"{path}:3", "malformed JSON (Expecting value at column 19)")]


def test_malformed_json_array_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"text": "a"},\n {"text": "b",,}\n]', encoding="utf-8")
    with pytest.raises(TunesmithError, match=r"bad.json:3: malformed JSON"):
        read_records(path, "pretrain")


def test_missing_column_lists_the_columns_found(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(TunesmithError) as exc:
        read_records(path, "alpaca", strict=True)
    assert exc.value.message == (
        f"{path}:1: missing column 'instruction', 'output' (columns found: 'question', 'answer')"
    )
    assert "list-dataset-format" in exc.value.hint
    with pytest.raises(TunesmithError) as exc:  # tolerant, but nothing at all reads: still an error
        read_records(path, "alpaca")
    assert exc.value.message == (
        f"{path}: none of its 1 records reads as format 'alpaca' (first: {path}:1: missing column 'instruction', "
        "'output' (columns found: 'question', 'answer'))"
    )
    assert "list-dataset-format" in exc.value.hint


@pytest.mark.parametrize("content", ["", "  \n\n \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TunesmithError, match=r"empty.jsonl is empty"):
        read_records(path, "conversation")


def test_whitespace_only_field(tmp_path):
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [{"conversation": [{"input": "a", "output": "b"}]}, {"conversation": [{"input": "a", "output": " \t"}]}],
    )
    with pytest.raises(TunesmithError) as exc:
        read_records(path, "conversation", strict=True)
    assert exc.value.message == f"{path}:2: turn 1: empty or whitespace-only 'output'"


def test_malformed_records_are_grouped_by_reason_with_their_first_lines(tmp_path):
    good = {"conversation": [{"input": "a", "output": "b"}]}
    rows = [good, {"conversation": [{"input": "a", "output": ""}]}, good,
            {"conversation": [good["conversation"][0], {"input": "x"}]},
            {"conversation": [{"input": "a", "output": " "}]},
            {"conversation": [good["conversation"][0], good["conversation"][0], {"input": "y"}]}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    records, stats = read_records(path, "conversation")
    assert [r.line for r in records] == [1, 3] and stats.records_read == 6 and stats.malformed == 4
    empty = "malformed: turn N: empty or whitespace-only 'output'"
    missing = "malformed: turn N: missing 'output' (keys found: 'input')"
    assert dict(stats.dropped) == {empty: 2, missing: 2}
    assert stats.malformed_at == {empty: [f"{path}:2", f"{path}:5"], missing: [f"{path}:4", f"{path}:6"]}


def test_missing_path_and_offline_hub(monkeypatch):
    import tunesmith.data.sources as readers

    with pytest.raises(TunesmithError, match="does not exist"):
        read_records("./no/such/file.jsonl", "oasst1")
    monkeypatch.setattr(readers, "_hub_reachable", lambda: False)
    with pytest.raises(TunesmithError, match="hub is offline"):
        read_records("timdettmers/openassistant-guanaco", "oasst1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TunesmithError) as exc:
        read_records("timdettmers/openassistant-guanaco", "oasst1")
    assert "hub is offline" in exc.value.message and "local" in exc.value.hint


def test_hub_dataset_when_online(monkeypatch):
    import datasets

    import tunesmith.data.sources as readers

    calls = []

    def fake_load(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_list([{"text": "### Human: hi### Assistant: hello"}] * 3)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr(readers, "_hub_reachable", lambda: True)
    records, stats = read_records("someone/guanaco-like", "oasst1", split="train")
    assert calls == [("someone/guanaco-like", None, "train")]
    assert stats.records_read == 3 and records[2].where == "someone/guanaco-like row 3"

    def unreachable(*a, **k):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(TunesmithError) as exc:
        read_records("someone/guanaco-like", "oasst1")
    assert "could not be loaded from the hub (Name or service not known)" in exc.value.message
    assert "hf download --repo-type dataset someone/guanaco-like" in exc.value.hint
