"""Bad input, command by command: one line on stderr naming what and where, exit code 2, no traceback, nothing
left behind (issue 15). Each case runs the real command line in this process (the CLI's own `main`), before
any model is loaded: the mistakes are all caught first."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import pytest

from tunesmith.cli.main import main


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad_inputs")
    good = d / "good.jsonl"
    good.write_text("".join(json.dumps({"conversation": [{"input": f"q{i}", "output": f"a{i}"}]}) + "\n"
                            for i in range(4)), encoding="utf-8")
    (d / "broken.jsonl").write_text('{"conversation": [{"input": "a", "output": "b"}]}\n{"conversation": [\n',
                                    encoding="utf-8")
    (d / "table.csv").write_text("Question,Answer\nwhat,that\nwho,them\n", encoding="utf-8")
    (d / "nocols.csv").write_text("Q,A\nwhat,that\n", encoding="utf-8")
    (d / "empty.csv").write_text("Question,Answer\n", encoding="utf-8")
    (d / "blocker").write_text("a file where a folder should be", encoding="utf-8")
    (d / "typo.yaml").write_text("method: lora\ntraning:\n  lr: 1e-4\n", encoding="utf-8")
    (d / "badkey.yaml").write_text("method: lora\ntraining:\n  lerning_rate: 1e-4\n", encoding="utf-8")
    (d / "syntax.yaml").write_text("method: lora\ntraining:\n  lr: [1e-4\n", encoding="utf-8")
    (d / "list.yaml").write_text("- method\n- lora\n", encoding="utf-8")
    (d / "xtuner.py").write_text("pretrained_model_name_or_path = 'internlm/internlm-chat-7b'\n", encoding="utf-8")
    (d / "badvalue.yaml").write_text("method: lora\ntraining:\n  lr: fast\n", encoding="utf-8")
    (d / "qlora_zero3.yaml").write_text("method: qlora\n", encoding="utf-8")
    (d / "nothing_here").mkdir()
    (d / "adapter_only").mkdir()
    (d / "adapter_only" / "adapter_config.json").write_text("{}", encoding="utf-8")
    (d / "no_weights").mkdir()
    (d / "no_weights" / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    (d / "notackpt").mkdir()
    (d / "half_ckpt").mkdir()
    (d / "half_ckpt" / "meta.json").write_text('{"format": "tunesmith-checkpoint", "version": 1, "step": 2',
                                              encoding="utf-8")
    return {p.name: p for p in d.iterdir()} | {"dir": d}


def _busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


# (command with {placeholders} for the files above, a piece of the one line it must print)
CASES = [
    # config: files, names, keys, values, rules that span keys
    ("train {dir}/missing.yaml", "does not exist"),
    ("train no_such_recipe_e3", "unknown config 'no_such_recipe_e3'"),
    ("train internlm_chat_7b_qlora_oasst1_e", "did you mean"),
    ("train {typo.yaml}", "traning"),
    ("train {badkey.yaml}", "lerning_rate"),
    ("train {syntax.yaml}", "line"),
    ("train {list.yaml}", "a config must be a mapping"),
    ("train {badvalue.yaml}", "training.lr"),
    ("train {qlora_zero3.yaml} --deepspeed deepspeed_zero3", "quant_storage"),
    ("train {qlora_zero3.yaml} --set distributed.deepspeed=deepspeed_zero3", "quant_storage"),
    ("train {qlora_zero3.yaml} --deepspeed deepspeed_zero9", "deepspeed"),
    ("train {qlora_zero3.yaml} --set method=prefix", "method"),
    ("train {qlora_zero3.yaml} --set training.lr", "has no '='"),
    ("train {qlora_zero3.yaml} --set =3", "empty key"),
    ("train {qlora_zero3.yaml} --set speed.compile=sometimes", "speed.compile"),
    ("train {qlora_zero3.yaml} --set speed.memory_fraction=1.5", "memory_fraction"),
    ("train {qlora_zero3.yaml} --set method=full quantization.bits=4", "full fine-tuning cannot train quantized"),
    ("train {qlora_zero3.yaml} --set data.system=a data.system_template=alpaca", "not both"),
    ("train {qlora_zero3.yaml} --work-dir {blocker}", "is a file, not a folder"),
    ("train {qlora_zero3.yaml} --work-dir {blocker}/run", "is a file, not a folder"),
    ("train {qlora_zero3.yaml} stray", "unexpected argument"),
    ("train {qlora_zero3.yaml} --resume {notackpt} --set model.path={nothing_here}", "meta.json"),
    ("train {qlora_zero3.yaml} --resume {half_ckpt} --set model.path={nothing_here}", "meta.json"),
    ("copy-cfg no_such_recipe {dir}", "unknown config"),
    ("copy-cfg internlm_chat_7b_qlora_oasst1_e3 {blocker}", "is a file, not a folder"),
    # data commands
    ("data convert {dir}/missing.csv {dir}/out1.jsonl", "does not exist"),
    ("data convert {good.jsonl} {dir}/out2.txt2 --input-col a", "--output-col"),
    ("data convert {table.csv} {table.csv} --input-col Question --output-col Answer", "would overwrite the input"),
    ("data convert {table.csv} {dir}/out3.jsonl --input-col Frage --output-col Answer", "Frage"),
    ("data convert {nocols.csv} {dir}/out4.jsonl", "columns found"),
    ("data convert {table.csv} {dir}/out5.jsonl --input-col Question --output-col Answer --system a "
     "--system-template alpaca", "not both"),
    ("data convert {table.csv} {dir}/out6.jsonl --input-col Question --output-col Answer --system-template nope",
     "nope"),
    ("data convert {table.csv} {blocker}/out.jsonl --input-col Question --output-col Answer",
     "is a file, not a folder"),
    ("data convert {dir}/table.xyz {dir}/out7.jsonl", "does not exist"),
    ("data split {dir}/missing.jsonl", "does not exist"),
    ("data split {good.jsonl} --train {dir}/same.jsonl --test {dir}/same.jsonl", "are the same path"),
    ("data split {good.jsonl} --train {good.jsonl}", "would overwrite the input"),
    ("data split {good.jsonl} --ratio 1.5", "--ratio"),
    ("data split {broken.jsonl}", "broken.jsonl:2: malformed JSON"),
    ("data split {good.jsonl} --train {blocker}/train.jsonl", "is a file, not a folder"),
    # data checks through a config
    ("check-custom-dataset {qlora_zero3.yaml} --set data.path={broken.jsonl} data.format=conversation "
     "model.path={nothing_here}", "no model weights"),
    ("check-custom-dataset {qlora_zero3.yaml} --set data.format=nope", "unknown dataset format 'nope'"),
    ("check-custom-dataset {qlora_zero3.yaml} --set data.prompt_template=nope", "unknown prompt template 'nope'"),
    ("log-dataset {qlora_zero3.yaml} --set data.prompt_template=nope", "unknown prompt template 'nope'"),
    ("log-dataset {qlora_zero3.yaml} --show everything", "--show"),
    # models
    ("chat {dir}/missing_model", "does not exist"),
    ("chat {nothing_here}", "no model weights"),
    ("chat {adapter_only}", "is a LoRA adapter, not a model"),
    ("chat {no_weights}", "no model weights"),
    ("chat {good.jsonl}", "is a file, not a model folder"),
    ("chat {no_weights} --prompt-template nope", "nope"),
    ("chat {no_weights} --bits 3", "--bits"),
    ("chat {no_weights} --torch-dtype fp8", "--torch-dtype"),
    ("chat {no_weights} --with-plugins calculate", "moss_sft"),
    ("eval {dir}/missing_model --data {good.jsonl}", "does not exist"),
    ("eval {no_weights} --data {dir}/missing.jsonl", "does not exist"),
    # export
    ("convert pth_to_hf {qlora_zero3.yaml} {notackpt} {dir}/hf", "meta.json"),
    ("convert pth_to_hf {qlora_zero3.yaml} {half_ckpt} {dir}/hf2", "meta.json"),
    ("convert merge {nothing_here} {adapter_only} {dir}/merged", "no model weights"),
    ("convert merge builtin:nope {adapter_only} {dir}/merged2", "builtin:nope"),
    ("convert split {nothing_here} {dir}/split", "no model weights"),
    ("convert split {dir}/missing_model {dir}/split2", "does not exist"),
    # servers
    ("serve {no_weights} --port 99999", "not a TCP port"),
    ("serve {no_weights} --port 0", "not a TCP port"),
    ("web {no_weights} --port 70000", "not a TCP port"),
    ("serve {no_weights} --host 999.1.1.1", "--host"),
    # bench
    ("bench --method prefix", "unknown method 'prefix'"),
    ("bench --model-shape internlm-70b", "model shape"),
    ("bench --end-to-end --rows 'train lorra'", "bench row"),
]


@pytest.mark.parametrize("command,expected", CASES, ids=[c for c, _ in CASES])
def test_bad_input_gets_one_line_and_exit_2(command, expected, files, capsys, monkeypatch):
    import shlex

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TUNESMITH_DEBUG", raising=False)
    before = set(files["dir"].iterdir())
    argv = shlex.split(re.sub(r"\{([\w.]+)\}", lambda m: str(files[m.group(1)]), command))
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err and err.count("\n") == 0, err
    assert expected.lower() in err.lower(), err
    assert set(files["dir"].iterdir()) == before, "something was left behind"


def test_busy_port_is_said_before_the_model_loads(files, capsys):
    sock = _busy_port()
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["serve", str(files["no_weights"]), "--port", str(sock.getsockname()[1])])
        assert exit_info.value.code == 2 and "already in use" in capsys.readouterr().err
    finally:
        sock.close()


def test_written_files_get_the_users_mode(files, tmp_path):
    old = os.umask(0o022)
    try:
        assert main(["data", "split", str(files["good.jsonl"]), "--train", str(tmp_path / "a.jsonl"), "--test",
                     str(tmp_path / "b.jsonl")]) is None
    except SystemExit as exc:
        assert exc.code in (0, None)
    finally:
        os.umask(old)
    for name in ("a.jsonl", "b.jsonl"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644
