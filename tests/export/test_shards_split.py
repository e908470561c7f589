"""shards.py (sizes, streaming safetensors writer, reader) and convert split."""

from __future__ import annotations

import pytest
import torch

from tests.export.helpers import model_logits, read_json
from tunesmith.errors import TunesmithError
from tunesmith.export.shards import (
    ShardWriter,
    list_tensors,
    parse_size,
    plan_shards,
    read_safetensors_header,
    save_sharded,
)
from tunesmith.export.split import split_checkpoint


@pytest.mark.parametrize("text,expected", [
    ("2GB", 2 * 10**9), ("500MB", 5 * 10**8), ("1GiB", 2**30), ("1.5gb", 15 * 10**8), ("10kb", 10**4),
    ("123", 123), (4096, 4096), (" 3 MiB ", 3 * 2**20),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "2 gigs", "-1GB", "0", "2XB"])
def test_parse_size_rejects(text):
    with pytest.raises(TunesmithError, match="max-shard-size"):
        parse_size(text)


def _tensors():
    gen = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=gen),
        "b.half": torch.randn(3, 3, generator=gen).half(),
        "c.bf16": torch.randn(11, generator=gen).bfloat16(),
        "d.ids": torch.arange(9, dtype=torch.int64).reshape(3, 3),
        "e.mask": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(2.5),
        "g.empty": torch.zeros(0, 4),
        "h.big": torch.randn(64, 64, generator=gen),
    }


def test_streaming_writer_round_trips_through_safetensors(tmp_path):
    from safetensors import safe_open

    tensors = _tensors()
    names = save_sharded(tensors, tmp_path, max_bytes=100)
    assert len(names) > 2 and names[0] == f"model-00001-of-{len(names):05d}.safetensors"
    index = read_json(tmp_path / "model.safetensors.index.json")
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for name, file in index["weight_map"].items():
        with safe_open(str(tmp_path / file), framework="pt") as f:  # the reference reader accepts our files
            assert f.metadata() == {"format": "pt"}
            assert torch.equal(f.get_tensor(name), tensors[name])
    refs = list_tensors([tmp_path / n for n in names])
    assert [r.name for r in refs] == list(tensors)  # order kept
    for ref in refs:
        assert torch.equal(ref.load(), tensors[ref.name])
    header, start = read_safetensors_header(tmp_path / names[0])
    assert start % 8 == 0


def test_single_shard_has_no_index_and_bin_output(tmp_path):
    tensors = _tensors()
    assert save_sharded(tensors, tmp_path / "s", max_bytes=10**9) == ["model.safetensors"]
    assert not (tmp_path / "s" / "model.safetensors.index.json").exists()
    names = save_sharded(tensors, tmp_path / "b", max_bytes=300, safe=False)
    assert names[0].startswith("pytorch_model-00001") and (tmp_path / "b" / "pytorch_model.bin.index.json").exists()
    loaded = {}
    for n in names:
        loaded.update(torch.load(tmp_path / "b" / n, weights_only=True))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert [r.name for r in list_tensors([tmp_path / "b" / n for n in names])] == list(tensors)


def test_plan_gives_oversized_tensors_their_own_shard():
    entries = [("a", torch.float32, (10,)), ("big", torch.float32, (1000,)), ("b", torch.float32, (10,))]
    assert [[e[0] for e in s] for s in plan_shards(entries, 100)] == [["a"], ["big"], ["b"]]


def test_writer_refuses_out_of_plan_tensors(tmp_path):
    writer = ShardWriter(tmp_path, [[("a", torch.float32, (2,))]])
    with pytest.raises(ValueError, match="planned"):
        writer.write("a", torch.zeros(3))
    writer.abort()


def test_corrupt_file_is_a_user_error(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(TunesmithError, match="not a readable safetensors file"):
        list_tensors([bad])


# ------------------------------------------------------------------------------------------ split
def test_split_safetensors(tiny_llama, tmp_path):
    result = split_checkpoint(tiny_llama, tmp_path / "split")
    out = tmp_path / "split"
    refs = list_tensors([tiny_llama / "model.safetensors"])
    assert result.shards == len(refs) and result.safe
    index = read_json(out / "model.safetensors.index.json")
    assert len(set(index["weight_map"].values())) == len(refs)  # one shard per tensor
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (tiny_llama / name).read_bytes()
    assert torch.equal(model_logits(out), model_logits(tiny_llama))


def test_split_bin(tiny_internlm_bin, tmp_path):
    split_checkpoint(tiny_internlm_bin, tmp_path / "split")
    out = tmp_path / "split"
    index = read_json(out / "pytorch_model.bin.index.json")  # plain JSON, read back
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == len(index["weight_map"]) and all(f.endswith(".bin") for f in files)
    assert (out / "tokenizer.model").is_file()
    assert torch.equal(model_logits(out), model_logits(tiny_internlm_bin))


def test_split_bad_input(tmp_path, tiny_llama):
    with pytest.raises(TunesmithError, match="does not exist"):
        split_checkpoint(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TunesmithError, match="no model weights"):
        split_checkpoint(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    with pytest.raises(TunesmithError, match="already exists"):
        split_checkpoint(tiny_llama, tmp_path / "out")
