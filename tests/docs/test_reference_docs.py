"""The reference pages in docs/ are generated from the code (docs/generate.py) and must stay in step with it:
the committed pages equal what the code generates now, every config key, dataset format and template is on its
page, and every format's example record reads through the real reader."""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

import pytest

from tunesmith.config.reference import schema_fields, schema_keys
from tunesmith.config.xtuner.names import XTUNER_NAMES
from tunesmith.data.format_examples import FORMAT_EXAMPLES
from tunesmith.data.readers import format_names, read_records
from tunesmith.data.templates import system_template_names, template_names

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
MAPPING = ROOT / "tunesmith" / "config" / "xtuner" / "mapping.py"


@pytest.fixture(scope="module")
def generate():
    """docs/generate.py, a script outside the package, loaded from its file."""
    spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def page(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def test_committed_pages_are_the_generated_ones(generate):
    stale = generate.stale_pages()
    assert not stale, f"stale pages {', '.join('docs/' + n for n in stale)}: run `python docs/generate.py`"


def test_check_names_a_missing_page(generate, tmp_path):
    assert generate.stale_pages(docs=tmp_path) == list(generate.PAGES)


def test_every_config_key_is_on_the_config_page_with_a_description():
    text = page("config.md")
    keys = schema_keys()
    assert "model.path" in keys and "training.lr" in keys and "method" in keys
    missing = [key for key in keys if f"| `{key}` |" not in text]
    assert not missing, f"not in docs/config.md: {missing}; run `python docs/generate.py`"
    undescribed = [key for key, field in schema_fields() if not field.description]
    assert not undescribed, f"keys without a description in schema.py: {undescribed}"


def test_xtuner_names_are_schema_keys():
    unknown = sorted(set(XTUNER_NAMES) - set(schema_keys()))
    assert not unknown, f"XTUNER_NAMES has keys the schema does not: {unknown}"


def test_every_key_mapping_reads_has_an_xtuner_name():
    """mapping.py reads XTuner settings with `self.take("<tunesmith key>", "<xtuner name>", ...)`."""
    taken = {node.args[0].value for node in ast.walk(ast.parse(MAPPING.read_text(encoding="utf-8")))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "take"
             and node.args and isinstance(node.args[0], ast.Constant)}
    assert "training.lr" in taken
    assert not sorted(taken - set(XTUNER_NAMES)), "keys mapping.py reads but XTUNER_NAMES lacks"


def test_every_format_has_an_example_record():
    assert set(FORMAT_EXAMPLES) == set(format_names())


@pytest.mark.parametrize("name", format_names())
def test_example_record_reads_through_the_reader(name, tmp_path):
    path = tmp_path / f"{name}.jsonl"
    path.write_text(json.dumps(FORMAT_EXAMPLES[name], ensure_ascii=False) + "\n", encoding="utf-8")
    records, stats = read_records(path, name)
    assert stats.conversations == 1 and len(records[0].turns) >= 1
    assert f"## `{name}`" in page("formats.md")


def test_every_template_is_on_the_templates_page():
    text = page("templates.md")
    missing = [name for name in template_names() if f"## `{name}`" not in text]
    missing += [name for name in system_template_names() if f"| `{name}` |" not in text]
    assert not missing, f"not in docs/templates.md: {missing}; run `python docs/generate.py`"
