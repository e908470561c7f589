"""Readers for eight single-turn dataset formats of XTuner 0.1.9 (its `*_map_fn` names): arxiv, colors,
crime_kg_assistant, law_reference, openorca, sql, stack_exchange, tiny_codes.

Each `map_fn(record) -> list[Turn]` renders the same system prompt, input and output as XTuner for the same
record (text is kept as is, whitespace included) and raises `RecordError` naming a missing or empty column.
`XTUNER_FORMATS` lists `(name, map_fn, description)` for the format registry in `tunesmith.data.readers`.
"""

from __future__ import annotations

from typing import Any

from tunesmith.data.conversation import RecordError, Turn
from tunesmith.data.fields import need, text_field
from tunesmith.data.templates import SYSTEM_TEMPLATES


def _pair(rec: Any, input_key: str, output_key: str, system: str = "") -> list[Turn]:
    need(rec, input_key, output_key)
    return [Turn(text_field(rec, input_key), text_field(rec, output_key), system)]


def arxiv_map_fn(rec: Any) -> list[Turn]:
    """arXiv metadata snapshot records (as `xtuner preprocess arxiv` keeps them): abstract -> title."""
    return _pair(rec, "abstract", "title", SYSTEM_TEMPLATES["arxiv_gentile"])


def colors_map_fn(rec: Any) -> list[Turn]:
    """burkelibbey/colors: the description without its leading `Name:` part -> the color code."""
    need(rec, "description", "color")
    desc = text_field(rec, "description").partition(":")[2].strip()
    if not desc:
        raise RecordError("'description' has no text after its 'name:' prefix")
    return [Turn(desc, text_field(rec, "color"), SYSTEM_TEMPLATES["colorist"])]


def crime_kg_assistant_map_fn(rec: Any) -> list[Turn]:
    """CrimeKgAssitant (XTuner's `crime_kg_assitant_map_fn`): input -> output."""
    return _pair(rec, "input", "output", SYSTEM_TEMPLATES["lawyer"])


def law_reference_map_fn(rec: Any) -> list[Turn]:
    """LaWGPT's answers with legal references: question -> answer."""
    return _pair(rec, "question", "answer", SYSTEM_TEMPLATES["lawyer"])


def openorca_map_fn(rec: Any) -> list[Turn]:
    """Open-Orca/OpenOrca: the record's own system_prompt (may be empty), question -> response."""
    need(rec, "system_prompt", "question", "response")
    system = text_field(rec, "system_prompt", allow_empty=True)
    return [Turn(text_field(rec, "question"), text_field(rec, "response"), system)]


def sql_map_fn(rec: Any) -> list[Turn]:
    """b-mc2/sql-create-context: "{context}\\n{question}" -> answer."""
    need(rec, "context", "question", "answer")
    prompt = f"{text_field(rec, 'context')}\n{text_field(rec, 'question')}"
    return [Turn(prompt, text_field(rec, "answer"), SYSTEM_TEMPLATES["sql"])]


def stack_exchange_map_fn(rec: Any) -> list[Turn]:
    """ArmelR/stack-exchange-instruction: question -> response, no system prompt."""
    return _pair(rec, "question", "response")


def tiny_codes_map_fn(rec: Any) -> list[Turn]:
    """nampdn-ai/tiny-codes: prompt -> response."""
    return _pair(rec, "prompt", "response", SYSTEM_TEMPLATES["coder"])


XTUNER_FORMATS = (
    ("arxiv", arxiv_map_fn, "arXiv metadata {abstract, title}: abstract -> title, system prompt 'arxiv_gentile'"),
    ("colors", colors_map_fn, "burkelibbey/colors {description, color}: 'Name: text' -> color, system 'colorist'"),
    ("crime_kg_assistant", crime_kg_assistant_map_fn, "CrimeKgAssitant {input, output}, system prompt 'lawyer'"),
    ("law_reference", law_reference_map_fn, "law Q&A with references {question, answer}, system prompt 'lawyer'"),
    ("openorca", openorca_map_fn, "Open-Orca {system_prompt, question, response}, the record's own system prompt"),
    ("sql", sql_map_fn, "sql-create-context {context, question, answer}: context + question -> SQL, system 'sql'"),
    ("stack_exchange", stack_exchange_map_fn, "stack-exchange-instruction {question, response}, no system prompt"),
    ("tiny_codes", tiny_codes_map_fn, "nampdn-ai/tiny-codes {prompt, response}, system prompt 'coder'"),
)
