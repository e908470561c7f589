"""Packing: nothing lost (property test), contamination-free attention in transformers 5, packed loss ==
unpacked loss, samplers, and the training-batch contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tunesmith.data.encode import IGNORE_INDEX, Encoded
from tunesmith.data.pack import (
    EpochSampler,
    LengthGroupedSampler,
    PackedDataset,
    SampleDataset,
    collate,
    cu_seqlens_from_position_ids,
    pack_bins,
)

VOCAB = 300


def fake_samples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = rng.integers(1, VOCAB, n).astype(np.int32)
        labels = ids.copy()
        labels[: max(1, n // 2)] = IGNORE_INDEX  # a prompt, then a reply
        out.append(Encoded(ids, labels))
    return out


@settings(max_examples=150, deadline=None)
@given(lengths=st.lists(st.integers(1, 64), min_size=1, max_size=60), max_length=st.integers(64, 160),
       seed=st.one_of(st.none(), st.integers(0, 5)))
def test_packing_never_loses_or_splits_a_token(lengths, max_length, seed):
    samples = fake_samples(lengths)
    bins = pack_bins(lengths, max_length, seed=seed)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # each sample exactly once
    ds = PackedDataset(samples, bins)
    assert all(n <= max_length for n in ds.lengths)
    seen = 0
    for row, b in enumerate(bins):
        item = ds[row]
        pos = item["position_ids"].numpy()
        starts = np.flatnonzero(pos == 0).tolist() + [len(pos)]
        assert len(starts) - 1 == len(b)
        for (lo, hi), idx in zip(zip(starts, starts[1:]), b):  # each sample intact, in place, positions 0..n-1
            assert item["input_ids"][lo:hi].tolist() == samples[idx].input_ids.tolist()
            assert pos[lo:hi].tolist() == list(range(hi - lo))
            assert item["labels"][lo + 1:hi].tolist() == samples[idx].labels[1:].tolist()
            assert item["labels"][lo] == IGNORE_INDEX
            seen += hi - lo
    assert seen == sum(lengths)
    # best-fit decreasing is never worse than one bin per max_length of tokens plus one
    assert len(bins) <= max(1, -(-2 * sum(lengths) // max_length))


def test_collate_contract_packed_and_unpacked():
    samples = fake_samples([5, 3, 4])
    packed = PackedDataset(samples, [[0, 1], [2]])
    batch = collate([packed[0], packed[1]], pad_token_id=0, packed=True)
    # no attention_mask; the sample boundaries computed on the host
    assert set(batch) == {"input_ids", "labels", "position_ids", "num_loss_tokens", "cu_seq_lens"}
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]]
    assert batch["labels"][1, 4:].tolist() == [IGNORE_INDEX] * 4
    assert batch["num_loss_tokens"] == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == 3 + 2 + 2
    assert batch["cu_seq_lens"].tolist() == [0, 5, 8, 12, 16] and batch["cu_seq_lens"].dtype == torch.int32
    cu = cu_seqlens_from_position_ids(torch.tensor([[0, 1, 2, 0, 1], [3, 4, 0, 1, 2]]))
    assert cu.tolist() == [0, 3, 5, 7, 10]  # a row may open mid-sample (transformers' rule)
    plain = SampleDataset(samples)
    batch = collate([plain[0], plain[1]], pad_token_id=7, packed=False)
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert batch["input_ids"][1, 3:].tolist() == [7, 7] and batch["labels"][1, 3:].tolist() == [IGNORE_INDEX] * 2
    full = collate([plain[0]], pad_token_id=0, packed=False)
    assert "attention_mask" not in full  # no padding, no mask


# ------------------------------------------------------------------ attention isolation in transformers 5
@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).float().eval()
    return model


def token_loss(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def forward(model, batch, impl):
    model.config._attn_implementation = impl
    kwargs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
    with torch.no_grad():
        return model(**kwargs, use_cache=False).logits


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_and_unpacked_batches_give_the_same_loss(tiny_llama, impl):
    samples = fake_samples([37, 12, 50, 9, 23, 31], seed=1)
    packed = PackedDataset(samples, pack_bins([len(s.input_ids) for s in samples], 64))
    assert len(packed) < len(samples)
    p_batch = collate([packed[i] for i in range(len(packed))], pad_token_id=0, packed=True)
    u_batch = collate([SampleDataset(samples)[i] for i in range(len(samples))], pad_token_id=0, packed=False)
    assert p_batch["num_loss_tokens"] == u_batch["num_loss_tokens"]
    p_loss = token_loss(forward(tiny_llama, p_batch, impl), p_batch["labels"]) / p_batch["num_loss_tokens"]
    u_loss = token_loss(forward(tiny_llama, u_batch, impl), u_batch["labels"]) / u_batch["num_loss_tokens"]
    assert abs(p_loss.item() - u_loss.item()) < 1e-5
    # transformers' own loss on the packed batch agrees too (it shifts inside)
    tiny_llama.config._attn_implementation = impl
    with torch.no_grad():
        hf = tiny_llama(input_ids=p_batch["input_ids"], position_ids=p_batch["position_ids"],
                        labels=p_batch["labels"], use_cache=False).loss
    assert abs(hf.item() - u_loss.item()) < 1e-5


def test_attention_never_crosses_samples(tiny_llama):
    a, b = fake_samples([20, 15], seed=2)
    row = PackedDataset([a, b], [[0, 1]])[0]
    batch = collate([row], pad_token_id=0, packed=True)
    changed = {k: v.clone() for k, v in batch.items() if torch.is_tensor(v)}
    changed["input_ids"][0, :20] = torch.randint(1, VOCAB, (20,), generator=torch.Generator().manual_seed(5))
    la, lb = forward(tiny_llama, batch, "sdpa"), forward(tiny_llama, changed, "sdpa")
    assert torch.allclose(la[0, 20:], lb[0, 20:], atol=1e-6)  # sample b does not see sample a
    alone = collate([SampleDataset([b])[0]], pad_token_id=0, packed=False)
    assert torch.allclose(forward(tiny_llama, alone, "sdpa")[0], la[0, 20:], atol=1e-5)


def test_guard_the_forward_must_run_without_kv_cache(tiny_llama):
    """transformers derives the packed mask from position_ids only when no cache is passed; with the default
    use_cache=True it builds a DynamicCache and attention crosses samples. The train loop passes use_cache=False.
    If this guard starts failing, transformers changed and the note in tunesmith/data/pack.py can go."""
    a, b = fake_samples([20, 15], seed=3)
    batch = collate([PackedDataset([a, b], [[0, 1]])[0]], pad_token_id=0, packed=True)
    alone = collate([SampleDataset([b])[0]], pad_token_id=0, packed=False)
    tiny_llama.config._attn_implementation = "sdpa"
    with torch.no_grad():
        cached = tiny_llama(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True).logits
        ref = tiny_llama(input_ids=alone["input_ids"], use_cache=True).logits
    assert not torch.allclose(cached[0, 20:], ref[0], atol=1e-3)


# ------------------------------------------------------------------ samplers
def test_length_grouped_sampler_is_seeded_sharded_and_resumable():
    lengths = [int(x) for x in np.random.default_rng(0).integers(1, 500, 203)]
    s = LengthGroupedSampler(lengths, 4, seed=1, epoch=0)
    order = list(s)
    assert sorted(order) == list(range(203)) and lengths[order[0]] == max(lengths)
    assert order == list(LengthGroupedSampler(lengths, 4, seed=1, epoch=0))
    assert order != list(LengthGroupedSampler(lengths, 4, seed=1, epoch=1))
    assert list(LengthGroupedSampler(lengths, 4, seed=1, epoch=0, start_index=40)) == order[40:]
    ranks = [list(LengthGroupedSampler(lengths, 4, seed=1, epoch=0, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) and set(ranks[0]) | set(ranks[1]) == set(range(203))
    # micro-batches hold similar lengths: far less spread than random batches
    spread = np.mean([np.ptp([lengths[i] for i in order[k:k + 4]]) for k in range(0, 200, 4)])
    assert spread < 100


def test_epoch_sampler_shards_and_resumes():
    full = list(EpochSampler(10, seed=0, epoch=2))
    assert sorted(full) == list(range(10)) and full == list(EpochSampler(10, seed=0, epoch=2))
    assert list(EpochSampler(10, seed=0, epoch=2, start_index=3)) == full[3:]
    r0, r1 = (list(EpochSampler(10, seed=0, epoch=2, rank=r, world_size=2)) for r in range(2))
    assert sorted(r0 + r1) == list(range(10))
