"""End to end on a tiny random Llama checkpoint (tests/fixtures): file -> dataset -> loader -> model loss.
Packed and unpacked loaders give the same loss over the whole epoch (fp32, 1e-5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.data.datahelp import make_cfg
from tunesmith.data.dataset import build_train_dataset
from tunesmith.data.encode import IGNORE_INDEX
from tunesmith.data.pack import make_dataloader


@pytest.fixture(scope="module")
def llama_dir(tiny_llama):
    return Path(tiny_llama)


def conversations(tmp_path):
    rows = []
    for i in range(24):
        turns = [{"input": f"hello world {i}", "output": "the model learns to answer " * (1 + i % 5)}]
        if i % 3 == 0:
            turns.append({"input": "please tell me why", "output": "because of data and code " * (1 + i % 4)})
        rows.append({"conversation": turns})
    path = tmp_path / "conv.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def epoch_loss(model, loader):
    total, n = 0.0, 0
    with torch.no_grad():
        for b in loader:
            kwargs = {k: b[k] for k in ("input_ids", "position_ids", "attention_mask") if k in b}
            logits = model(**kwargs, use_cache=False).logits
            total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1),
                                     ignore_index=IGNORE_INDEX, reduction="sum").item()
            n += b["num_loss_tokens"]
    return total / n, n


@pytest.mark.parametrize("template", ["auto", "default"])
def test_packed_and_unpacked_epochs_have_the_same_loss(tmp_path, llama_dir, template):
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(llama_dir)
    model = LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    model.config._attn_implementation = "sdpa"
    path = conversations(tmp_path)
    results = []
    for packed in (True, False):
        cfg = make_cfg(tmp_path, path=str(path), format="conversation", prompt_template=template, max_length=128,
                       pack_to_max_length=packed)
        cfg.training.batch_size = 2
        dataset, stats = build_train_dataset(cfg, tok)
        assert stats.samples == 24 and stats.dropped == {}
        results.append(epoch_loss(model, make_dataloader(dataset, cfg, seed=0, epoch=0)))
        first = dataset[0]["input_ids"].tolist()
        assert first[0] == tok.bos_token_id  # this tokenizer starts sequences with BOS
    (p_loss, p_n), (u_loss, u_n) = results
    assert p_n == u_n > 0
    assert abs(p_loss - u_loss) < 1e-5
