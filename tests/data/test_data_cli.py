"""The data commands: output, and bad input -> one line naming file and line, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.data.datahelp import FILES, make_cfg
from tests.timeouts import TIMEOUT
from tunesmith.cli.main import main


def run(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out = capsys.readouterr()
    return exc.value.code or 0, out.out, out.err


def config_file(tmp_path, **data):
    cfg = make_cfg(tmp_path, **data)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")), encoding="utf-8")
    return path


def test_list_commands(capsys):
    code, out, _ = run(capsys, "list-template")
    assert code == 0 and "internlm_chat" in out and "auto" in out and "medical_professor" in out
    code, out, _ = run(capsys, "list-dataset-format")
    assert code == 0 and all(n in out for n in ("oasst1", "alpaca", "msagent_react", "conversation", "openai"))


def test_data_convert_and_split(tmp_path, capsys):
    out_file = tmp_path / "qa.jsonl"
    code, out, err = run(capsys, "data", "convert", str(FILES / "qa.csv"), str(out_file), "--input-col", "Question",
                         "--output-col", "Answer", "--system-template", "medical_professor")
    assert code == 0, err
    assert "4 rows read" in out and "2 records written" in out and "2 dropped" in out and "qa.csv:5" in out
    assert len(out_file.read_text().splitlines()) == 2
    code, out, err = run(capsys, "data", "split", str(out_file), "--ratio", "0.5", "--seed", "3")
    assert code == 0 and "1 records ->" in out and (tmp_path / "qa-train.jsonl").exists()


def test_check_custom_dataset_lists_problems_with_lines(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    rows = [{"conversation": [{"input": "a", "output": "b"}]}, {"conversation": [{"input": "a", "output": ""}]},
            {"question": "q"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    code, out, _ = run(capsys, "check-custom-dataset", str(config_file(tmp_path, path=str(data),
                                                                         format="conversation")), "--no-tokenizer")
    assert code == 2
    assert f"{data}:2: turn 1: empty or whitespace-only 'output'" in out
    assert f"{data}:3: missing column 'conversation' (columns found: 'question')" in out
    assert "NOT OK" in out
    data.write_text(json.dumps(rows[0]) + "\n", encoding="utf-8")
    code, out, _ = run(capsys, "check-custom-dataset", str(tmp_path / "cfg.yaml"), "--no-tokenizer")
    assert code == 0 and out.rstrip().endswith("OK")


@pytest.mark.parametrize("setting,expected", [
    ({"format": "alpacca"}, "error: unknown dataset format 'alpacca' (hint: did you mean 'alpaca'"),
    ({"prompt_template": "qwen"}, "error: unknown prompt template 'qwen'"),
])
def test_unknown_names_exit_2(tmp_path, capsys, setting, expected):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n', encoding="utf-8")
    cfg = config_file(tmp_path, path=str(data), **{"format": "oasst1", **setting})
    code, out, err = run(capsys, "log-dataset", str(cfg))
    assert code == 2 and err.startswith(expected) and len(err.strip().splitlines()) == 1


def test_empty_file_and_missing_column_exit_2(tmp_path, capsys):
    (tmp_path / "e.csv").write_text("", encoding="utf-8")
    code, _, err = run(capsys, "data", "convert", str(tmp_path / "e.csv"), str(tmp_path / "o.jsonl"))
    assert code == 2 and err.startswith(f"error: {tmp_path / 'e.csv'} is empty")
    code, _, err = run(capsys, "data", "convert", str(FILES / "qa.csv"), str(tmp_path / "o.jsonl"), "--input-col",
                       "Q", "--output-col", "Answer")
    assert code == 2 and "no column 'Q' (columns found: 'id', 'Question', 'Answer', 'Note')" in err


def test_malformed_json_line_is_listed_exit_2_in_a_real_process(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "### Human: a### Assistant: b"}\n{"text": oops}\n', encoding="utf-8")
    cfg = config_file(tmp_path, path=str(data), format="oasst1")
    proc = subprocess.run([sys.executable, "-m", "tunesmith", "check-custom-dataset", str(cfg), "--no-tokenizer"],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    # the checker lists a line that is not JSON like any other bad record, and goes on to the rest
    assert f"  {data}:2: malformed JSON (Expecting value at column 10)" in proc.stdout.splitlines()
    assert "2 records, 1 usable conversations" in proc.stdout and "NOT OK" in proc.stdout


def test_log_dataset_shows_masked_text(tmp_path, capsys, smol_tok, monkeypatch):
    import tunesmith.cli.data_cmds as cmds

    monkeypatch.setattr(cmds, "_tokenizer", lambda cfg: smol_tok)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"conversation": [{"input": "Hi", "output": "Hello!"}]}) + "\n", encoding="utf-8")
    cfg = config_file(tmp_path, path=str(data), format="conversation", prompt_template="chatml", system="S")
    code, out, err = run(capsys, "log-dataset", str(cfg), "--show", "masked_text")
    assert code == 0, err
    assert "[masked_text]\n[masked: 16]Hello!<|im_end|>[masked: 1]" in out and "[input_ids]" not in out
    code, out, _ = run(capsys, "log-dataset", str(cfg), "--show", "all")
    assert "<|im_start|>system\nS<|im_end|>" in out and "[labels]\n[-100," in out
