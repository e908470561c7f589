"""The XTuner 0.1.9 single-turn formats: a record shaped like the real dataset's -> the turn XTuner renders
(system prompt, input, output, whitespace kept), and the RecordError a bad record gets."""

from __future__ import annotations

import pytest

from tunesmith.data.conversation import RecordError, Turn
from tunesmith.data.xtuner_readers import (
    XTUNER_FORMATS,
    arxiv_map_fn,
    colors_map_fn,
    crime_kg_assistant_map_fn,
    law_reference_map_fn,
    openorca_map_fn,
    sql_map_fn,
    stack_exchange_map_fn,
    tiny_codes_map_fn,
)

ARXIV_GENTILE = ("If you are an expert in writing papers, please generate a good paper title for this paper based on "
                 "other authors' descriptions of their abstracts.\n")
COLORIST = ("You are a professional color designer. Please provide the corresponding colors based on the description "
            "of Human.\n")
CODER = "You are a professional programer. Please provide the corresponding code based on the description of Human.\n"
LAWYER = "你现在是一名专业的中国律师，请根据用户的问题给出准确、有理有据的回复。\n"
SQL = ("If you are an expert in SQL, please generate a good SQL Query for Question based on the CREATE TABLE "
       "statement.\n")


def test_registry_names_and_functions():
    assert [name for name, _, _ in XTUNER_FORMATS] == [
        "arxiv", "colors", "crime_kg_assistant", "law_reference", "openorca", "sql", "stack_exchange", "tiny_codes"]
    fns = {name: fn for name, fn, _ in XTUNER_FORMATS}
    assert fns["arxiv"] is arxiv_map_fn and fns["crime_kg_assistant"] is crime_kg_assistant_map_fn
    assert fns["sql"] is sql_map_fn and fns["tiny_codes"] is tiny_codes_map_fn
    assert all(isinstance(desc, str) and desc and "\n" not in desc for _, _, desc in XTUNER_FORMATS)


def test_arxiv_abstract_to_title_raw_text_kept():
    rec = {"id": "2001.00001", "submitter": "A. Author", "authors": "A. Author, B. Author",
           "title": "Attention Is Enough:\n  A Study", "comments": "8 pages", "journal-ref": None, "doi": None,
           "categories": "cs.CL cs.AI", "license": None,
           "abstract": "  We study attention.\nIt is enough in most cases.\n",
           "versions": [{"version": "v1", "created": "Wed, 1 Jan 2020 00:00:00 GMT"}], "update_date": "2020-01-02",
           "authors_parsed": [["Author", "A.", ""], ["Author", "B.", ""]]}
    assert arxiv_map_fn(rec) == [Turn("  We study attention.\nIt is enough in most cases.\n",
                                      "Attention Is Enough:\n  A Study", ARXIV_GENTILE)]


def test_colors_drops_the_name_before_the_first_colon():
    rec = {"color": "#5f9ea0", "description": "Cadet blue: A muted teal: calm, cool and slightly grey. "}
    assert colors_map_fn(rec) == [Turn("A muted teal: calm, cool and slightly grey.", "#5f9ea0", COLORIST)]


def test_colors_without_a_name_prefix_is_an_error():
    with pytest.raises(RecordError, match="'description' has no text after its 'name:' prefix"):
        colors_map_fn({"color": "#000000", "description": "Pure black with no name"})
    with pytest.raises(RecordError, match="'description' has no text"):
        colors_map_fn({"color": "#000000", "description": "Black:   "})


def test_crime_kg_assistant_input_output_with_lawyer_prompt():
    rec = {"input": "酒驾撞人要判多久？", "output": "根据《刑法》第一百三十三条，\n一般处三年以下有期徒刑或者拘役。"}
    assert crime_kg_assistant_map_fn(rec) == [
        Turn("酒驾撞人要判多久？", "根据《刑法》第一百三十三条，\n一般处三年以下有期徒刑或者拘役。", LAWYER)]


def test_law_reference_question_answer_ignores_reference():
    rec = {"question": "借款到期不还怎么办？", "answer": "可以向人民法院提起诉讼。",
           "reference": ["《民法典》第六百七十五条：借款人应当按照约定的期限返还借款。"]}
    assert law_reference_map_fn(rec) == [Turn("借款到期不还怎么办？", "可以向人民法院提起诉讼。", LAWYER)]


def test_openorca_own_system_prompt_and_empty_one():
    rec = {"id": "niv.242684", "system_prompt": "You are an AI assistant. Provide a detailed answer.",
           "question": "Translate to French: Hello, world.", "response": "Bonjour, le monde."}
    assert openorca_map_fn(rec) == [Turn("Translate to French: Hello, world.", "Bonjour, le monde.",
                                         "You are an AI assistant. Provide a detailed answer.")]
    rec = {"id": "flan.1", "system_prompt": "", "question": "2+2=?", "response": "4"}
    assert openorca_map_fn(rec) == [Turn("2+2=?", "4", "")]


def test_sql_context_newline_question():
    rec = {"answer": "SELECT COUNT(*) FROM head WHERE age > 56",
           "question": "How many heads of the departments are older than 56 ?",
           "context": "CREATE TABLE head (age INTEGER)"}
    assert sql_map_fn(rec) == [Turn("CREATE TABLE head (age INTEGER)\n"
                                    "How many heads of the departments are older than 56 ?",
                                    "SELECT COUNT(*) FROM head WHERE age > 56", SQL)]


def test_stack_exchange_has_no_system_prompt():
    rec = {"qid": 12345, "question": "How do I reverse a list in Python?", "date": "2010/10/15",
           "metadata": ["https://stackoverflow.com/questions/12345"], "response": "Use `lst[::-1]` or `reversed(lst)`."}
    assert stack_exchange_map_fn(rec) == [Turn("How do I reverse a list in Python?",
                                               "Use `lst[::-1]` or `reversed(lst)`.", "")]


def test_tiny_codes_prompt_response_with_coder_prompt():
    rec = {"prompt": "Write a Rust function that adds two numbers.", "main_topic": "Arithmetic",
           "subtopic": "Addition", "adjective": "simple", "action_verb": "add", "scenario": "a calculator",
           "target_audience": "beginners", "programming_language": "Rust", "common_sense_topic": "math",
           "idx": 7, "response": "```rust\nfn add(a: i32, b: i32) -> i32 {\n    a + b\n}\n```"}
    assert tiny_codes_map_fn(rec) == [Turn("Write a Rust function that adds two numbers.",
                                           "```rust\nfn add(a: i32, b: i32) -> i32 {\n    a + b\n}\n```", CODER)]


@pytest.mark.parametrize("fn, rec, column", [
    (arxiv_map_fn, {"abstract": "An abstract."}, "'title'"),
    (sql_map_fn, {"answer": "SELECT 1", "question": "One?"}, "'context'"),
    (openorca_map_fn, {"id": "x", "question": "Q?", "response": "A."}, "'system_prompt'"),
    (tiny_codes_map_fn, {"prompt": "Write code."}, "'response'"),
    (law_reference_map_fn, {"question": "问？", "reference": []}, "'answer'"),
])
def test_missing_column_is_named(fn, rec, column):
    with pytest.raises(RecordError, match=f"missing column {column}"):
        fn(rec)


@pytest.mark.parametrize("fn, rec, column", [
    (stack_exchange_map_fn, {"question": "Why?", "response": "   "}, "'response'"),
    (crime_kg_assistant_map_fn, {"input": "", "output": "答。"}, "'input'"),
    (openorca_map_fn, {"system_prompt": "", "question": "Q?", "response": ""}, "'response'"),
])
def test_empty_column_is_named(fn, rec, column):
    with pytest.raises(RecordError, match=f"empty or whitespace-only {column}"):
        fn(rec)


def test_not_an_object():
    with pytest.raises(RecordError, match="expected a JSON object"):
        colors_map_fn(["#fff", "White: bright"])


def test_the_formats_read_files_by_name(tmp_path):
    import json

    from tunesmith.data.readers import read_records

    path = tmp_path / "sql.jsonl"
    path.write_text(json.dumps({"answer": "SELECT 1", "question": "one?", "context": "CREATE TABLE t (a INT)"}) + "\n")
    records, stats = read_records(path, "sql")
    assert stats.conversations == 1
    assert records[0].turns == (Turn("CREATE TABLE t (a INT)\none?", "SELECT 1", SQL),)
