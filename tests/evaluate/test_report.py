"""`tunesmith eval` end to end on a tiny model: report files, side-by-side, loss-only mode, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunesmith.cli.main import build_app
from tunesmith.evaluate.run import detect_format

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def conv_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("evaldata") / "held_out.jsonl"
    rows = [{"conversation": [{"input": f"question number {i} about cats", "output": f"the answer is {i} cats"}]}
            for i in range(7)]
    rows.append({"conversation": [{"input": "hi", "output": "hello"}, {"input": "and then?", "output": "bye now"}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _run(*args: str):
    return CliRunner().invoke(build_app(), list(args))


def test_eval_writes_report_with_side_by_side(tiny_llama, conv_file, tmp_path):
    out = tmp_path / "report"
    res = _run("eval", str(tiny_llama), "--data", str(conv_file), "--compare", str(tiny_llama),
               "--max-new-tokens", "4", "--out", str(out), "--no-progress")
    assert res.exit_code == 0, res.output
    assert {p.name for p in out.iterdir()} == {"report.md", "report.json", "report.png"}  # no temporaries left
    report = json.loads((out / "report.json").read_text())
    assert report["format"] == "conversation" and report["samples"] == 8
    assert len(report["models"]) == 2 and report["models"][1]["name"].endswith("#2")
    for m in report["models"]:
        assert m["loss"] > 0 and m["perplexity"] == pytest.approx(2.718281828 ** m["loss"], rel=1e-6)
        assert 0 <= m["rougeL"] <= 1 and 0 <= m["bleu"] <= 100 and m["generated"] == 8
        assert len(m["per_sample_loss"]) == 8
    a, b = report["models"]
    assert a["loss"] == pytest.approx(b["loss"])  # the same model twice
    assert report["examples"] and set(report["examples"][0]["outputs"]) == {a["name"], b["name"]}
    md = (out / "report.md").read_text()
    assert "| loss (nats / token) |" in md and "| change |" in md and "ROUGE-L" in md and "report.png" in md
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_loss_only(tiny_llama, conv_file, tmp_path):
    res = _run("eval", str(tiny_llama), "--data", str(conv_file), "--max-new-tokens", "0", "--max-samples", "3",
               "--out", str(tmp_path / "r"), "--no-progress")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    (m,) = report["models"]
    assert report["samples"] == 3 and "rougeL" not in m and m["loss_tokens"] > 0


def test_eval_bad_input_is_one_line(tiny_llama, tmp_path):
    from tunesmith.cli.main import main

    missing = tmp_path / "nope.jsonl"
    with pytest.raises(SystemExit) as info:
        main(["eval", str(tiny_llama), "--data", str(missing), "--out", str(tmp_path / "r")])
    assert info.value.code == 2
    assert not (tmp_path / "r").exists()


def test_format_detection(tmp_path):
    assert detect_format(str(ROOT / "examples/data/oasst1_guanaco_eval.jsonl")) == "oasst1"
    p = tmp_path / "m.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
                 + "\n")
    assert detect_format(str(p)) == "openai"


def test_eval_help_has_an_example():
    res = _run("eval", "--help")
    assert res.exit_code == 0 and "tunesmith eval ./merged --data" in res.output
    res = _run("serve", "--help")
    assert res.exit_code == 0 and "tunesmith serve builtin:smollm2-135m-instruct" in res.output
    res = _run("web", "--help")
    assert res.exit_code == 0 and "tunesmith web builtin:smollm2-135m-instruct" in res.output
