"""End-to-end training on a tiny random Llama (in-process): LoRA, full, QLoRA; logs, checkpoints, errors."""

from __future__ import annotations

import json

import pytest
import torch

from tunesmith.errors import TunesmithError
from tunesmith.train import train


def _records(work):
    return [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]


def test_lora_run_writes_everything(make_cfg, tmp_path):
    cfg = make_cfg()
    work = tmp_path / "work"
    result = train(cfg, work_dir=work, progress=False)
    assert result.steps == result.total_steps > 4
    recs = _records(work)
    assert [r["step"] for r in recs] == list(range(1, result.steps + 1))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "memory_gb", "epoch"} <= recs[0].keys()
    first, last = recs[0]["loss"], min(r["loss"] for r in recs[-3:])
    assert last < first, (first, last)
    for name in ("loss.png", "config.yaml", "environment.json", "last_checkpoint", "eval_outputs/step_0.txt",
                 "eval_outputs/step_4.txt", f"eval_outputs/step_{result.steps}.txt"):
        assert (work / name).exists(), name
    assert list((work / "tensorboard").iterdir())
    ep = work / "epoch_2.pth"
    assert (work / "epoch_1.pth").is_dir() and ep.is_dir()
    assert (work / "last_checkpoint").read_text().strip() == str(ep)
    meta = json.loads((ep / "meta.json").read_text())
    assert meta["format"] == "tunesmith-checkpoint" and meta["method"] == "lora" and meta["step"] == result.steps
    assert sorted(p.name for p in ep.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                    "config.yaml", "meta.json", "optimizer.safetensors",
                                                    "trainer_state.json"]
    # the adapter is in PEFT's saved layout: peft can load it onto the base model
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(ep))
    saved = load_file(str(ep / "adapter_model.safetensors"))
    live = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert len(saved) == len(live) > 0
    assert not any(".pth" in p.name for p in work.glob(".*"))  # no temporaries left


def test_full_finetune_run(make_cfg, tmp_path):
    cfg = make_cfg(method="full", training={"max_steps": 3, "lr": 1e-3, "save_steps": 2},
                   evaluation={"inputs": []})
    work = tmp_path / "work"
    result = train(cfg, work_dir=work, progress=False)
    assert result.steps == 3
    assert sorted(p.name for p in work.glob("*.pth")) == ["iter_2.pth", "iter_3.pth"]
    from safetensors.torch import load_file

    weights = load_file(str(work / "iter_3.pth" / "model.safetensors"))
    assert "model.embed_tokens.weight" in weights and "lm_head.weight" in weights  # HF names, untied head
    assert not (work / "iter_3.pth" / "adapter_config.json").exists()


def test_progress_bars_report_tokenizing_and_steps(make_cfg, tmp_path, monkeypatch):
    """With progress on a terminal, the tokenizing bar receives (done, total) and the training bar every step,
    drawn from the same step line train.log gets."""
    from rich.progress import Progress

    monkeypatch.setattr("tunesmith.train.runlog.is_terminal", lambda **kw: True)
    updates: list[dict] = []
    real_update = Progress.update

    def spy(self, task, **kw):
        updates.append(kw)
        return real_update(self, task, **kw)

    monkeypatch.setattr(Progress, "update", spy)
    cfg = make_cfg(training={"max_steps": 2}, evaluation={"inputs": []}, data={"cache_dir": str(tmp_path / "c")})
    train(cfg, work_dir=tmp_path / "work", progress=True)
    seen = [(u["completed"], u["total"]) for u in updates if "total" in u]
    assert seen and seen[-1][0] == seen[-1][1] > 0  # tokenized every conversation
    steps = [u for u in updates if "description" in u]
    assert [u["completed"] for u in steps] == [1, 2]
    log = (tmp_path / "work" / "train.log").read_text()
    assert all(u["description"] in log.splitlines() for u in steps)


def test_qlora_run(make_cfg, tmp_path):
    pytest.importorskip("bitsandbytes")
    cfg = make_cfg(method="qlora", training={"max_steps": 2}, evaluation={"inputs": []})
    result = train(cfg, work_dir=tmp_path / "work", progress=False)
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert (tmp_path / "work" / "iter_2.pth" / "adapter_model.safetensors").exists()


def test_resume_with_other_config_is_refused(make_cfg, tmp_path):
    work = tmp_path / "work"
    train(make_cfg(training={"max_steps": 2}, evaluation={"inputs": []}), work_dir=work, progress=False)
    other = make_cfg(training={"max_steps": 2, "lr": 1e-2}, evaluation={"inputs": []})
    with pytest.raises(TunesmithError, match=r"different config \(training.lr 0.\d+ -> 0.01\)"):
        train(other, work_dir=work, resume="auto", progress=False)


def test_resume_may_run_longer_and_change_what_leaves_the_arithmetic_alone(make_cfg, tmp_path, capsys):
    work = tmp_path / "work"
    train(make_cfg(training={"max_steps": 2}, evaluation={"inputs": []}), work_dir=work, progress=False)
    longer = make_cfg(training={"max_steps": 4, "save_total_limit": 3}, evaluation={"inputs": []})
    result = train(longer, work_dir=work, resume="auto", progress=False)
    assert result.steps == 4 and result.last_checkpoint.name == "iter_4.pth"
    out = capsys.readouterr().out
    assert "resuming with changed settings: training.max_steps 2 -> 4, training.save_total_limit 2 -> 3" in out
    again = train(longer, work_dir=work, resume="auto", progress=False)  # a finished run: nothing to do
    assert again.steps == 4 and "iter_4.pth is the end of this run (4 of 4 steps): nothing left to train" \
        in capsys.readouterr().out


def test_nan_loss_stops_with_step(make_cfg, tmp_path, monkeypatch):
    from tunesmith.train import loss as loss_mod

    real = loss_mod.CausalLMLoss.forward

    def nan_forward(self, batch):
        s, n = real(self, batch)
        return s * float("nan"), n

    monkeypatch.setattr(loss_mod.CausalLMLoss, "forward", nan_forward)
    with pytest.raises(TunesmithError, match=r"loss became nan at step 1"):
        train(make_cfg(training={"max_steps": 2}, evaluation={"inputs": []}), work_dir=tmp_path / "w",
              progress=False)


def test_out_of_memory_names_what_to_lower(make_cfg, tmp_path, monkeypatch):
    from tunesmith.train import loss as loss_mod

    def oom(self, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loss_mod.CausalLMLoss, "forward", oom)
    with pytest.raises(TunesmithError) as info:
        train(make_cfg(training={"max_steps": 2}, evaluation={"inputs": []}), work_dir=tmp_path / "w",
              progress=False)
    text = str(info.value)
    for setting in ("out of memory", "training.batch_size", "data.max_length", "gradient_checkpointing",
                    "deepspeed_zero", "method=qlora"):
        assert setting in text, setting


def test_out_of_memory_while_loading_is_one_line_too(make_cfg, tmp_path, monkeypatch):
    from tunesmith.train import loop

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 13.00 GiB")

    monkeypatch.setattr(loop, "load_model", oom)
    with pytest.raises(TunesmithError, match="CUDA out of memory during training") as info:
        train(make_cfg(training={"max_steps": 2, "gradient_checkpointing": True}, evaluation={"inputs": []}),
              work_dir=tmp_path / "w", progress=False)
    assert "speed.memory_fraction" not in str(info.value)  # no activation plan was made: it would change nothing
    assert not (tmp_path / "w").exists()


def test_oom_hint_names_memory_fraction_only_for_a_planned_run(make_cfg):
    from tunesmith.train.failures import oom_error

    cfg = make_cfg(training={"gradient_checkpointing": True})
    assert "speed.memory_fraction" in oom_error(cfg, 0, planned=True).hint
    assert "speed.memory_fraction" not in oom_error(cfg, 0, planned=False).hint


def test_deepspeed_missing_leaves_no_work_dir(make_cfg, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    with pytest.raises(TunesmithError, match="needs the deepspeed package"):
        train(make_cfg(distributed={"deepspeed": "deepspeed_zero2"}), work_dir=tmp_path / "w", progress=False)
    assert not (tmp_path / "w").exists()
