"""build_train_dataset: stats, caching (no re-tokenizing, no pickle), the data loader, oasst1 pad fraction."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tunesmith.data.dataset as dataset_mod
from tests.data.datahelp import make_cfg, shared_file
from tests.timeouts import TIMEOUT
from tunesmith.data.dataset import build_train_dataset, cache_root
from tunesmith.data.encode import IGNORE_INDEX
from tunesmith.data.pack import make_dataloader
from tunesmith.errors import TunesmithError


def small_file(tmp_path, n=30):
    rows = [{"conversation": [{"input": f"question {i}?", "output": "answer " * (i % 7 + 1)}]} for i in range(n)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_oasst1_packs_at_2048_with_little_padding(tmp_path, smol_tok):
    cfg = make_cfg(tmp_path, path=str(shared_file("oasst1/openassistant_best_replies_eval.jsonl")), format="oasst1",
                   prompt_template="chatml", max_length=2048)
    dataset, stats = build_train_dataset(cfg, smol_tok)
    assert stats.records_read == 518 and stats.conversations == 518 and stats.dropped == {}
    assert stats.samples == 518 and sum(len(b) for b in dataset.bins) == 518  # nothing dropped by packing
    assert sum(stats.truncated.values()) > 0  # long ones are reported
    assert stats.pad_fraction < 0.05 and stats.packed_sequences == len(dataset)
    assert sum(dataset.lengths) == stats.tokens and max(dataset.lengths) <= 2048
    assert stats.turns_histogram == {"1": 342, "2": 167, "3": 9}


def test_second_build_is_a_cache_hit_without_tokenizing(tmp_path, smol_tok, monkeypatch):
    cfg = make_cfg(tmp_path, path=str(small_file(tmp_path)), format="conversation", prompt_template="chatml",
                   max_length=128)
    calls = []
    first, s1 = build_train_dataset(cfg, smol_tok, progress=lambda done, total: calls.append((done, total)))
    assert not s1.cache_hit and calls[-1] == (30, 30)

    def boom(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(dataset_mod, "encode_records", boom)
    monkeypatch.setattr(dataset_mod, "read_records", boom)
    second, s2 = build_train_dataset(cfg, smol_tok)
    assert s2.cache_hit and s2.tokens == s1.tokens and s2.samples == 30
    assert [first[i]["input_ids"].tolist() for i in range(len(first))] == [
        second[i]["input_ids"].tolist() for i in range(len(second))]
    with np.load(next((tmp_path / "cache").rglob("samples.npz")), allow_pickle=False) as z:
        assert z["offsets"][-1] == s1.tokens  # plain arrays, loadable without pickle


def test_cache_key_changes_with_content_template_and_settings(tmp_path, smol_tok):
    path = small_file(tmp_path)
    cfg = make_cfg(tmp_path, path=str(path), format="conversation", prompt_template="chatml", max_length=128)
    build_train_dataset(cfg, smol_tok)
    for change in [dict(prompt_template="qwen_chat"), dict(max_length=256), dict(system="Be brief.")]:
        _, stats = build_train_dataset(make_cfg(tmp_path, path=str(path), format="conversation",
                                                **{"prompt_template": "chatml", "max_length": 128, **change}),
                                       smol_tok)
        assert not stats.cache_hit
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"conversation": [{"input": "new", "output": "row"}]}) + "\n")
    _, stats = build_train_dataset(cfg, smol_tok)
    assert not stats.cache_hit and stats.samples == 31


def test_cache_dir_default_and_env(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, cache_dir=None)
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "tc"))
    assert cache_root(cfg) == tmp_path / "tc" / "datasets"
    monkeypatch.delenv("TUNESMITH_CACHE")
    assert str(cache_root(cfg)).endswith(".cache/tunesmith/datasets")
    assert cache_root(make_cfg(tmp_path, cache_dir=str(tmp_path / "x"))) == tmp_path / "x"


def test_system_template_and_dataloader_batches(tmp_path, smol_tok):
    cfg = make_cfg(tmp_path, path=str(small_file(tmp_path)), format="conversation", prompt_template="chatml",
                   system_template="medical_professor", max_length=64, pack_to_max_length=False)
    cfg.training.batch_size = 4
    dataset, stats = build_train_dataset(cfg, smol_tok)
    assert not dataset.packed and stats.packed_sequences == 0 and dataset.pad_token_id == smol_tok.pad_token_id
    text = smol_tok.decode(dataset[0]["input_ids"].tolist())
    assert text.startswith("<|im_start|>system\nYou are a professional, highly experienced doctor professor.")
    loader = make_dataloader(dataset, cfg, seed=0, epoch=0)
    batches = list(loader)
    assert sum(b["input_ids"].shape[0] for b in batches) == 30
    for b in batches:
        assert b["labels"].shape == b["input_ids"].shape == b["position_ids"].shape
        assert b["num_loss_tokens"] == int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
        if "attention_mask" in b:
            assert (b["labels"][b["attention_mask"] == 0] == IGNORE_INDEX).all()
    resumed = list(make_dataloader(dataset, cfg, seed=0, epoch=0, start_index=8))
    assert [b["input_ids"].tolist() for b in resumed] == [b["input_ids"].tolist() for b in batches[2:]]


def test_packed_loader_over_two_ranks_covers_everything(tmp_path, smol_tok):
    cfg = make_cfg(tmp_path, path=str(small_file(tmp_path)), format="conversation", prompt_template="chatml",
                   max_length=96)
    dataset, stats = build_train_dataset(cfg, smol_tok)
    served = []
    for rank in range(2):
        loader = make_dataloader(dataset, cfg, seed=3, epoch=1, rank=rank, world_size=2)
        served += list(loader.sampler)
        for b in loader:
            assert "attention_mask" not in b and b["input_ids"].shape[1] <= 96
    assert set(served) == set(range(len(dataset)))  # every packed sequence, hence every sample, is served
    assert sum(len(dataset.bins[i]) for i in set(served)) == stats.samples == 30


def test_unknown_format_and_template_fail_before_reading(tmp_path, smol_tok):
    with pytest.raises(TunesmithError, match="unknown dataset format 'alpacca'"):
        build_train_dataset(make_cfg(tmp_path, path="missing.jsonl", format="alpacca"), smol_tok)
    with pytest.raises(TunesmithError, match="unknown prompt template 'chatmll'"):
        build_train_dataset(make_cfg(tmp_path, path="missing.jsonl", format="oasst1", prompt_template="chatmll"),
                            smol_tok)


def test_check_dataset_reports_lengths_and_over_long_samples(tmp_path, smol_tok):
    from tunesmith.data.check import check_dataset

    rows = [{"conversation": [{"input": "q", "output": "word " * n}]} for n in (5, 10, 200)]
    rows.append({"conversation": [{"input": "q", "output": ""}]})
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    report = check_dataset(make_cfg(tmp_path, path=str(path), format="conversation", prompt_template="chatml",
                                    max_length=64), smol_tok)
    assert not report.ok and [p.where for p in report.problems] == [f"{path}:4"]
    assert len(report.lengths) == 3 and report.over_max_length == 1
    assert report.truncated == {"inside_turn": 1}
    text = report.format()
    assert "tokens per sample: min" in text and "longer than max_length 64: 1" in text and "#" in text
    assert sum(c for _, _, c in report.histogram()) == 3


def test_package_entry_points():
    import subprocess
    import sys

    import tunesmith.data as data

    assert data.build_train_dataset is build_train_dataset and data.make_dataloader is make_dataloader
    assert data.IGNORE_INDEX == -100 and "oasst1" in data.format_names()
    # importing the package (templates, conversation) does not pull in torch
    code = "import sys, tunesmith.data; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=TIMEOUT).stdout.strip() == "False"


def test_max_dataset_length_takes_a_seeded_random_subset_in_file_order():
    from tunesmith.data.conversation import Turn
    from tunesmith.data.dataset import keep_random_subset
    from tunesmith.data.readers import ReadStats, Record

    records = [Record((Turn(f"q{i}", f"a{i}"),), f"f.jsonl:{i + 1}", i + 1) for i in range(50)]

    def pick(seed):
        stats = ReadStats(records_read=50, conversations=50)
        kept = keep_random_subset(records, stats, 10, seed=seed)
        assert stats.conversations == 10 and sum(stats.dropped.values()) == 40
        return [r.line for r in kept]

    first = pick(0)
    assert len(first) == 10 and first == sorted(first) and first != list(range(1, 11))
    assert pick(0) == first and pick(1) != first
    assert keep_random_subset(records, ReadStats(), None, seed=0) == records
    assert keep_random_subset(records, ReadStats(), 80, seed=0) == records


def test_malformed_records_are_skipped_and_summarised_unless_strict(tmp_path, smol_tok):
    path = small_file(tmp_path, n=6)
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[2] = json.dumps({"conversation": [{"input": "no reply here"}]})
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = make_cfg(tmp_path, path=str(path), format="conversation", prompt_template="chatml", max_length=128)
    _, stats = build_train_dataset(cfg, smol_tok)
    assert stats.conversations == 5 and stats.samples == 5
    summary = stats.summary()
    assert "dropped 0\n" in summary  # skipped records are reported on their own, not as deliberate drops
    assert (f"skipped 1 malformed records (data.strict: true stops at the first instead):\n"
            f"  turn N: missing 'output' (keys found: 'input'): 1 (first at {path}:3)") in summary
    _, cached = build_train_dataset(cfg, smol_tok)  # the cache keeps the locations
    assert cached.cache_hit and cached.malformed_at == stats.malformed_at
    strict = make_cfg(tmp_path, path=str(path), format="conversation", prompt_template="chatml", max_length=128,
                      strict=True)
    with pytest.raises(TunesmithError, match=r"d.jsonl:3: turn 1: missing 'output'"):
        build_train_dataset(strict, smol_tok, use_cache=False)
