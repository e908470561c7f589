"""data convert / data split: tables -> conversation JSONL, seeded splits, bad input."""

from __future__ import annotations

import json

import pytest

from tests.data.datahelp import FILES, shared_file
from tunesmith.data.convert import convert_table, split_records
from tunesmith.data.readers import read_records
from tunesmith.data.templates import MEDICAL_PROFESSOR
from tunesmith.errors import TunesmithError


def lines(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_medinfo2019_xlsx_gives_689_records_with_the_tutorial_prompt(tmp_path):
    src = shared_file("medqa/MedInfo2019-QA-Medications.xlsx")
    out = tmp_path / "medqa.jsonl"
    result = convert_table(src, out, input_col="Question", output_col="Answer", system_template="medical_professor")
    assert (result.rows, result.written, len(result.dropped)) == (690, 689, 1)
    assert result.dropped[0].endswith("empty 'Answer'")
    records = lines(out)
    assert len(records) == 689
    assert all(r["conversation"][0]["system"] == MEDICAL_PROFESSOR for r in records)
    assert records[0]["conversation"][0]["input"] == "how does rivatigmine and otc sleep medicine interact"
    assert len(read_records(out, "conversation")[0]) == 689  # the result trains as-is


def test_own_xlsx_fixture_with_sheet_and_dropped_rows(tmp_path):
    from openpyxl import Workbook

    wb = Workbook()
    wb.active.title = "Other"
    wb.active.append(["nothing"])
    ws = wb.create_sheet("QA")
    ws.append(["Question", "Answer", "Extra"])
    ws.append(["What is X?", "X is a letter.", 1])
    ws.append(["Blank answer", None, 2])
    ws.append([None, "no question", 3])
    ws.append(["Number answer?", 42, 4])
    wb.save(tmp_path / "qa.xlsx")
    result = convert_table(tmp_path / "qa.xlsx", tmp_path / "qa.jsonl", sheet="QA", system="Be exact.")
    assert (result.input_col, result.output_col) == ("Question", "Answer")  # guessed
    assert result.written == 2 and [d.split(": ", 1)[1] for d in result.dropped] == ["empty 'Answer'",
                                                                                     "empty 'Question'"]
    assert result.dropped[0].endswith("qa.xlsx row 3: empty 'Answer'")
    assert lines(tmp_path / "qa.jsonl")[1] == {"conversation": [{"system": "Be exact.", "input": "Number answer?",
                                                                 "output": "42"}]}


def test_csv_with_quotes_and_newlines(tmp_path):
    result = convert_table(FILES / "qa.csv", tmp_path / "o.jsonl", input_col="question", output_col="answer")
    assert result.written == 2 and len(result.dropped) == 2
    assert lines(tmp_path / "o.jsonl")[1]["conversation"][0] == {
        "input": 'What is "ibuprofen"?', "output": "An NSAID, used for pain\nand fever."}


def test_missing_column_lists_the_columns_found(tmp_path):
    with pytest.raises(TunesmithError) as exc:
        convert_table(FILES / "qa.csv", tmp_path / "o.jsonl", input_col="Question", output_col="Response")
    assert exc.value.message.endswith("no column 'Response' (columns found: 'id', 'Question', 'Answer', 'Note')")
    assert not (tmp_path / "o.jsonl").exists()
    with pytest.raises(TunesmithError, match="cannot tell which columns"):
        convert_table(FILES / "array_saved_as.jsonl", tmp_path / "o.jsonl")


def test_split_is_seeded_and_keeps_every_record(tmp_path):
    src = tmp_path / "all.jsonl"
    src.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(100)), encoding="utf-8")
    assert split_records(src, tmp_path / "a.jsonl", tmp_path / "b.jsonl", ratio=0.7, seed=0) == (70, 30)
    a, b = lines(tmp_path / "a.jsonl"), lines(tmp_path / "b.jsonl")
    assert sorted(r["i"] for r in a + b) == list(range(100))
    assert [r["i"] for r in a] == sorted(r["i"] for r in a)  # original order kept in each part
    split_records(src, tmp_path / "a2.jsonl", tmp_path / "b2.jsonl", seed=0)
    assert lines(tmp_path / "a2.jsonl") == a
    split_records(src, tmp_path / "a3.jsonl", tmp_path / "b3.jsonl", seed=1)
    assert lines(tmp_path / "a3.jsonl") != a
    split_records(src, seed=0)  # default names next to the input
    assert (tmp_path / "all-train.jsonl").exists() and (tmp_path / "all-test.jsonl").exists()
    with pytest.raises(TunesmithError, match="ratio"):
        split_records(src, ratio=1.5)


def test_convert_jsonl_and_parquet_inputs(tmp_path):
    import pandas as pd

    src = tmp_path / "in.jsonl"
    src.write_text('{"query": "q1", "response": "r1"}\n{"query": "q2", "response": "  "}\n', encoding="utf-8")
    result = convert_table(src, tmp_path / "o.jsonl")
    assert (result.input_col, result.written, len(result.dropped)) == ("query", 1, 1)
    pd.DataFrame({"input": ["a"], "output": ["b"]}).to_parquet(tmp_path / "in.parquet")
    convert_table(tmp_path / "in.parquet", tmp_path / "p.jsonl", system_template="coder")
    assert lines(tmp_path / "p.jsonl")[0]["conversation"][0]["output"] == "b"
