"""The convert commands through the real CLI entry point: help with examples, success, bad input (exit 2)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.export.helpers import (
    model_logits,
    peft_logits,
    train_config,
    write_checkpoint,
    write_config,
)
from tests.timeouts import TIMEOUT
from tunesmith.cli.main import main


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run `tunesmith ARGS` in-process (same error convention as the console script)."""
    capsys.readouterr()  # drop what fixtures printed
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out = capsys.readouterr()
    return int(info.value.code or 0), out.out, out.err


@pytest.mark.parametrize("command,example", [
    ("pth_to_hf", "tunesmith convert pth_to_hf ./internlm_chat_7b_qlora_oasst1_e3_copy.yaml"),
    ("merge", "tunesmith convert merge ./internlm-chat-7b ./hf ./merged --max-shard-size 2GB"),
    ("split", "tunesmith convert split ./merged ./merged-split"),
])
def test_help_shows_an_example(capsys, command, example):
    code, out, _ = cli(capsys, "convert", command, "--help")
    assert code == 0 and example in out
    if command == "pth_to_hf":
        assert "--fp32" in out and "--no-safe-serialization" in out
        assert "Tensors already in bf16 stay bf16" in " ".join(out.split())
    if command == "merge":
        for flag in ("--max-shard-size", "--device", "--dtype", "--trust-remote-code", "--overwrite"):
            assert flag in out


def test_convert_is_listed(capsys):
    code, out, _ = cli(capsys, "convert", "--help")
    assert code == 0 and all(c in out for c in ("pth_to_hf", "merge", "split"))


def test_pth_to_hf_then_merge_then_split(capsys, bases, tmp_path):
    base = bases["qwen2"]
    cfg = train_config(base, "lora", template="chatml")
    ckpt, _ = write_checkpoint(cfg, tmp_path / "work" / "epoch_1.pth")
    config = write_config(cfg, tmp_path / "cfg.yaml")
    code, out, err = cli(capsys, "convert", "pth_to_hf", str(config), str(ckpt), str(tmp_path / "hf"), "--fp32")
    assert code == 0, err
    assert "wrote PEFT adapter (float32)" in out and "convert merge" in out
    code, out, err = cli(capsys, "convert", "merge", str(base), str(tmp_path / "hf"), str(tmp_path / "merged"),
                         "--max-shard-size", "100KB", "--device", "cpu", "--trust-remote-code")
    assert code == 0, err
    assert "merged 14 LoRA modules" in out and "shard(s)" in out
    assert (model_logits(tmp_path / "merged") - peft_logits(base, tmp_path / "hf")).abs().max() < 1e-5
    code, out, err = cli(capsys, "convert", "split", str(tmp_path / "merged"), str(tmp_path / "split"))
    assert code == 0 and "safetensors shards" in out, err


@pytest.mark.parametrize("args,message", [
    (["merge", "{base}", "{tmp}/no_adapter", "{tmp}/out"], "error: adapter folder"),
    (["merge", "{tmp}/no_base", "{adapter}", "{tmp}/out"], "error: model path"),
    (["merge", "{base}", "{adapter}", "{tmp}/out", "--device", "tpu"], "error: unknown --device 'tpu'"),
    (["merge", "{base}", "{adapter}", "{tmp}/out", "--dtype", "int3"], "error: unknown dtype 'int3'"),
    (["merge", "{base}", "{adapter}", "{tmp}/out", "--max-shard-size", "big"], "error: --max-shard-size 'big'"),
    (["merge", "{base}", "{adapter}", "{base}"], "error: the destination"),
    (["pth_to_hf", "{tmp}/missing.yaml", "{tmp}", "{tmp}/out"], "error: config file"),
    (["split", "{tmp}/nothing", "{tmp}/out"], "error: model folder"),
])
def test_bad_input_exit_2_one_line(capsys, bases, adapter_factory, tmp_path, args, message):
    fill = {"base": str(bases["llama"]), "adapter": str(adapter_factory(bases["llama"])), "tmp": str(tmp_path)}
    code, out, err = cli(capsys, "convert", *[a.format(**fill) for a in args])
    assert code == 2, (out, err)
    assert err.startswith(message) and err.strip().count("\n") == 0 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_usage_error_exit_2(capsys):
    code, _, err = cli(capsys, "convert", "merge", "only-one-arg")
    assert code == 2 and "Missing argument" in err


def test_console_script_exit_code(tmp_path):
    """The real process: one line on stderr, exit code 2."""
    out = subprocess.run([sys.executable, "-m", "tunesmith", "convert", "split", str(tmp_path / "none"),
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 2 and out.stderr.startswith("error: model folder")
