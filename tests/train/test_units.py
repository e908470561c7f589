"""Unit tests of the training pieces that need no real model: schedule, token-weighted loss, checkpoint
format and atomicity, DeepSpeed config resolution, the torchrun launcher, metrics and the plot."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from tunesmith.config import TrainConfig
from tunesmith.errors import TunesmithError
from tunesmith.train import checkpoint as ckpt
from tunesmith.train.optim import Schedule, build_optimizer, lr_factor


def _training(**kw):
    return TrainConfig(method="lora", training=kw).training


# ----------------------------------------------------------------------------------------- schedule
def test_warmup_then_cosine_to_floor():
    t = _training(warmup_ratio=0.1, lr_scheduler="cosine", min_lr_ratio=0.1, lr=1e-3)
    f = [lr_factor(s, 100, t) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # 10 warm-up steps, linear
    assert all(a >= b - 1e-12 for a, b in zip(f[10:], f[11:]))  # decays monotonically
    assert f[10] == pytest.approx(1.0) and lr_factor(100, 100, t) == pytest.approx(0.1)
    assert lr_factor(55, 100, t) == pytest.approx(0.1 + 0.9 * 0.5, abs=0.02)  # half-way = mid value


def test_schedule_state_roundtrip_sets_lr():
    t = _training(warmup_ratio=0.0, lr=1.0, lr_scheduler="linear")
    p = torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer([p], t)
    s = Schedule(opt, 10, t)
    for _ in range(4):
        s.step()
    s2 = Schedule(build_optimizer([p], t), 10, t)
    s2.load_state_dict(s.state_dict())
    assert s2.get_last_lr() == s.get_last_lr() == pytest.approx(0.6)


def test_bnb_optimizer_builds():
    pytest.importorskip("bitsandbytes")
    p = torch.nn.Parameter(torch.zeros(4096))
    opt = build_optimizer([p], _training(optimizer="adamw_8bit"))
    assert "8bit" in type(opt).__name__


# ----------------------------------------------------------------------------------------- token-weighted loss
def _tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).float()


def _samples(n=4):
    g = torch.Generator().manual_seed(1)
    out = []
    for length in (5, 11, 7, 16)[:n]:
        ids = torch.randint(3, 64, (length,), generator=g)
        labels = ids.clone()
        labels[: length // 2] = -100  # prompt: no loss, different share per sample
        out.append({"input_ids": ids, "labels": labels, "position_ids": torch.arange(length)})
    return out


def _grads(model, windows):
    from tunesmith.data.pack import collate
    from tunesmith.train.loss import CausalLMLoss, scaled_micro_loss, window_tokens

    model.zero_grad()
    module = CausalLMLoss(model, {"chunked": False})
    for window in windows:
        batches = [collate(items, 0, packed=False) for items in window]
        total = window_tokens(batches)
        for b in batches:
            loss_sum, _ = module(b)
            scaled_micro_loss(loss_sum, total).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_token_weighted_accumulation_matches_one_big_batch():
    model = _tiny_lm()
    s = _samples()
    big = _grads(model, [[s]])  # batch 4 x accumulation 1
    accum = _grads(model, [[[x] for x in s]])  # batch 1 x accumulation 4
    assert big.keys() == accum.keys()
    for name in big:
        torch.testing.assert_close(accum[name], big[name], rtol=1e-5, atol=1e-6, msg=name)


def test_mean_of_means_would_differ():
    """The test above is meaningful: the mean of micro-batch means gives another gradient."""
    from tunesmith.data.pack import collate

    model = _tiny_lm()
    s = _samples()
    big = _grads(model, [[s]])
    model.zero_grad()
    for x in s:
        b = collate([x], 0, packed=False)
        out = model(input_ids=b["input_ids"], labels=b["labels"], use_cache=False)
        (out.loss / 4).backward()
    name = next(iter(big))
    assert not torch.allclose(dict(model.named_parameters())[name].grad, big[name], atol=1e-6)


# ----------------------------------------------------------------------------------------- checkpoint format
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("fused", [False, True])  # the loop uses the fused kernel for CUDA parameters
def test_optimizer_state_roundtrip_bit_exact(fused, device):
    p = [torch.nn.Parameter(torch.randn(3, 4, device=device)), torch.nn.Parameter(torch.randn(5, device=device))]
    opt = torch.optim.AdamW(p, lr=1e-2, betas=(0.8, 0.95), fused=fused)
    for _ in range(3):
        sum((x ** 2).sum() for x in p).backward()
        opt.step()
    tensors, rest = ckpt.flatten_optimizer_state(opt.state_dict())
    json.dumps(rest)  # JSON-able
    opt2 = torch.optim.AdamW([torch.nn.Parameter(x.detach().clone()) for x in p], lr=5.0, fused=fused)
    opt2.load_state_dict(ckpt.unflatten_optimizer_state(tensors, json.loads(json.dumps(rest))))
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        for k in a:
            assert torch.equal(a[k], b[k])
    assert opt2.param_groups[0]["lr"] == 1e-2 and tuple(opt2.param_groups[0]["betas"]) == (0.8, 0.95)


def test_nested_optimizer_state_roundtrip():
    """bitsandbytes' 8-bit and paged optimizers nest their quantization tensors under one key."""
    state = {"state": {0: {"step": 3, "__bnb_optimizer_quant_state__": {
        "state1": torch.randint(0, 255, (8,), dtype=torch.uint8), "absmax1": torch.rand(2),
        "qmap1": torch.linspace(-1, 1, 16)}}, 1: {"step": torch.tensor(2.0)}},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.99), "params": [0, 1], "optim_bits": 8}]}
    tensors, rest = ckpt.flatten_optimizer_state(state)
    assert set(tensors) == {"state.0.__bnb_optimizer_quant_state__.state1",
                            "state.0.__bnb_optimizer_quant_state__.absmax1",
                            "state.0.__bnb_optimizer_quant_state__.qmap1", "state.1.step"}
    back = ckpt.unflatten_optimizer_state(tensors, json.loads(json.dumps(rest)))
    inner = back["state"][0]["__bnb_optimizer_quant_state__"]
    assert back["state"][0]["step"] == 3 and torch.equal(inner["state1"], state["state"][0][
        "__bnb_optimizer_quant_state__"]["state1"])
    assert torch.equal(back["state"][1]["step"], torch.tensor(2.0))
    assert back["param_groups"][0]["betas"] == (0.9, 0.99) and back["param_groups"][0]["params"] == [0, 1]
    with pytest.raises(TypeError, match="cannot store"):
        ckpt.flatten_optimizer_state({"state": {0: {"odd": object()}}, "param_groups": []})


def test_rng_state_roundtrip():
    state = json.loads(json.dumps(ckpt.rng_state()))
    a = (random.random(), np.random.rand(), torch.rand(2))
    ckpt.set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(2))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def _save(path, step=1, chash="h"):
    return ckpt.save_checkpoint(
        path, meta={"method": "lora", "epoch": 0, "step": step, "config_hash": chash, "base_model": "m"},
        config_yaml="method: lora\n", weights={"w": torch.ones(2)}, weights_file="adapter_model.safetensors",
        adapter_config={"r": 8}, optimizer_tensors=[{"state.0.exp_avg": torch.zeros(2)}],
        trainer_state={"step": step})


def test_checkpoint_layout_and_no_pickle(tmp_path):
    p = _save(tmp_path / "iter_1.pth")
    names = sorted(x.name for x in p.iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors", "config.yaml", "meta.json",
                     "optimizer.safetensors", "trainer_state.json"]
    loaded = ckpt.load_checkpoint(p)
    assert loaded["meta"]["format"] == "tunesmith-checkpoint" and loaded["meta"]["version"] == 1
    assert torch.equal(loaded["weights"]["w"], torch.ones(2))


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    import errno

    p = _save(tmp_path / "iter_1.pth", step=1)
    ckpt.write_last_checkpoint(tmp_path, p)

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", disk_full)
    with pytest.raises(TunesmithError, match="no space left"):
        _save(tmp_path / "iter_1.pth", step=2)  # overwriting the same name must not lose the old one
    monkeypatch.undo()
    assert ckpt.load_checkpoint(p)["meta"]["step"] == 1
    assert ckpt.find_last_checkpoint(tmp_path) == p.resolve()
    assert [x.name for x in tmp_path.iterdir() if x.name.startswith(".")] == []


def test_rotation_keeps_last_iter_and_all_epochs(tmp_path):
    for s in (2, 4, 6, 8):
        _save(tmp_path / f"iter_{s}.pth", step=s)
    _save(tmp_path / "epoch_1.pth", step=5)
    ckpt.rotate_iter_checkpoints(tmp_path, 2)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["epoch_1.pth", "iter_6.pth", "iter_8.pth"]
    assert ckpt.find_last_checkpoint(tmp_path).name == "iter_8.pth"  # no marker: newest by step


def test_other_config_hash_is_refused(tmp_path):
    p = _save(tmp_path / "iter_1.pth", chash="aaaa")
    with pytest.raises(TunesmithError, match="different config"):
        ckpt.check_resumable(ckpt.read_meta(p), p, TrainConfig(method="lora", training={"lr": 1e-3}), "bbbb",
                             print)
    with pytest.raises(TunesmithError, match="not a tunesmith checkpoint|no readable meta"):
        ckpt.read_meta(tmp_path)


# ----------------------------------------------------------------------------------------- deepspeed / launch
@pytest.mark.parametrize("name", ["deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero2_offload",
                                  "deepspeed_zero3", "deepspeed_zero3_offload"])
def test_deepspeed_configs_resolve_auto(name):
    from tunesmith.train.distributed import resolve_deepspeed_config

    cfg = TrainConfig(method="lora", training={"batch_size": 2, "accumulative_counts": 3, "max_norm": 0.5})
    ds = resolve_deepspeed_config(name, cfg, world_size=4, precision="bf16")
    assert "auto" not in json.dumps(ds)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == int(name.split("zero")[1][0])


def test_unknown_deepspeed_name():
    from tunesmith.train.distributed import resolve_deepspeed_config

    with pytest.raises(TunesmithError, match="unknown DeepSpeed config"):
        resolve_deepspeed_config("deepspeed_zero4", TrainConfig(method="lora"), world_size=1, precision="fp32")


def test_torchrun_relaunch_command(monkeypatch):
    from tunesmith.train.launch import torchrun_command

    for k in ("LOCAL_RANK", "NPROC_PER_NODE", "NNODES", "NODE_RANK", "ADDR", "PORT"):
        monkeypatch.delenv(k, raising=False)
    assert torchrun_command(["c.yaml"]) is None
    monkeypatch.setenv("NPROC_PER_NODE", "8")
    monkeypatch.setenv("NNODES", "2")
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("ADDR", "10.0.0.1")
    monkeypatch.setenv("PORT", "29501")
    cmd = torchrun_command(["c.yaml", "--deepspeed", "deepspeed_zero2"])
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert {"--nnodes=2", "--node_rank=1", "--nproc_per_node=8", "--master_addr=10.0.0.1",
            "--master_port=29501"} <= set(cmd)
    assert cmd[-5:] == ["tunesmith", "train", "c.yaml", "--deepspeed", "deepspeed_zero2"]
    monkeypatch.setenv("LOCAL_RANK", "0")  # already a torchrun child
    assert torchrun_command(["c.yaml"]) is None


# ----------------------------------------------------------------------------------------- metrics
def test_metrics_jsonl_tensorboard_plot_and_resume_cut(tmp_path):
    from tunesmith.train.metrics import MetricsWriter

    m = MetricsWriter(tmp_path, report_to=["tensorboard"], plot=True)
    for s in range(1, 6):
        m.log(s, {"loss": 3.0 / s, "lr": 1e-4})
    assert m.plot().exists()
    m.close()
    assert list((tmp_path / "tensorboard").iterdir())
    m2 = MetricsWriter(tmp_path, report_to=[], resume_step=3)
    assert [r["step"] for r in m2.records()] == [1, 2, 3]
    assert MetricsWriter(tmp_path / "x", enabled=False).plot() is None


def test_resume_auto_skips_a_damaged_checkpoint_with_a_warning(tmp_path):
    """A checkpoint cut short (trainer_state.json half written by a copy, a damaged weights file) is passed over
    for the one before it, with one line saying so; asked for by name, it is a one-line error."""
    from safetensors.torch import save_file

    def write(step, state='{"step": 1}'):
        path = tmp_path / f"iter_{step}.pth"
        path.mkdir()
        save_file({"w": torch.zeros(2)}, str(path / "adapter_model.safetensors"))
        save_file({"state.0.exp_avg": torch.zeros(2)}, str(path / "optimizer.safetensors"))
        (path / "trainer_state.json").write_text(state)
        (path / "meta.json").write_text(json.dumps({"format": ckpt.FORMAT, "version": 1, "step": step}))
        return path

    good = write(2)
    bad = write(4, state='{"step": 4, "rng": [')
    ckpt.write_last_checkpoint(tmp_path, bad)
    said = []
    assert ckpt.find_last_checkpoint(tmp_path, warn=said.append) == good
    assert len(said) == 1 and "iter_4.pth" in said[0] and "trainer_state.json" in said[0]
    with pytest.raises(TunesmithError, match="cannot be resumed from"):
        ckpt.load_checkpoint(bad)
    (good / "adapter_model.safetensors").write_bytes(b"\x00\x01not safetensors")
    assert ckpt.find_last_checkpoint(tmp_path, warn=said.append) is None


def test_a_run_that_fails_early_leaves_no_work_dir(make_cfg, tmp_path):
    from tunesmith.train import train

    work = tmp_path / "runs" / "never"
    with pytest.raises(TunesmithError):
        train(make_cfg(data={"path": str(tmp_path / "missing.jsonl")}), work_dir=work, progress=False)
    assert not work.exists()
