"""`tunesmith train` on the command line: help with an example, bad input as one line + exit 2, a run."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from tunesmith.cli.main import build_app, main


def test_train_help_shows_example_and_flags():
    result = CliRunner().invoke(build_app(), ["train", "--help"])
    assert result.exit_code == 0
    for text in ("Example", "--work-dir", "--deepspeed", "--resume", "--seed", "--set", "--cfg-options",
                 "NPROC_PER_NODE"):
        assert text in result.output, text


def test_bad_inputs_are_one_line_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TUNESMITH_DEBUG", raising=False)
    for argv, expected in [
        (["train", str(tmp_path / "missing.yaml")], "does not exist"),
        (["train", "smollm2_135m_instruct_lora_oasst1_e1", "--set", "training.lrr=1"], "did you mean"),
        (["train", "smollm2_135m_instruct_lora_oasst1_e1", "--deepspeed", "deepspeed_zero9",
          "--work-dir", str(tmp_path / "w")], "unknown DeepSpeed config"),
        (["train", "smollm2_135m_instruct_lora_oasst1_e1", "--work-dir", str(tmp_path / "w"), "--resume",
          str(tmp_path / "nope.pth")], "does not exist"),
    ]:
        try:
            main(argv)
            raise AssertionError("no error")
        except SystemExit as exc:
            assert exc.code == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err and "Traceback" not in err, (argv, err)


def test_cli_run_with_overrides_alias_and_seed(make_cfg, tmp_path):
    cfg = make_cfg(evaluation={"inputs": []})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")), encoding="utf-8")
    work = tmp_path / "work"
    try:
        main(["train", str(path), "--work-dir", str(work), "--cfg-options", "training.max_steps=2",
              "training.save_steps=1", "--seed", "7", "--no-progress"])
    except SystemExit as exc:
        assert exc.code in (0, None)
    meta = json.loads((work / "iter_2.pth" / "meta.json").read_text())
    assert meta["step"] == 2 and meta["seed"] == 7
    saved = yaml.safe_load((work / "config.yaml").read_text())
    assert saved["training"]["max_steps"] == 2 and saved["training"]["seed"] == 7
