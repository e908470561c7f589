"""Done-when on CPU: SmolLM2-135M-Instruct + LoRA on oasst1 records: the loss falls, the evaluation answers
are printed and saved, loss.png and metrics.jsonl exist (about 30 s on 2 CPU cores; skipped without the model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# the guanaco eval sample bundled with the examples (Apache-2.0; the same file as ../shared/data/oasst1's)
OASST1 = Path(__file__).resolve().parents[2] / "examples" / "data" / "oasst1_guanaco_eval.jsonl"


def test_smollm2_lora_oasst1_loss_falls(smollm2_path, tmp_path, capsys):
    if not OASST1.exists():
        pytest.skip(f"{OASST1} is not on this machine")
    from tunesmith.config import load_config
    from tunesmith.train import train

    cfg, _ = load_config("smollm2_135m_instruct_lora_oasst1_e1", [
        f"data.path={OASST1}", "data.max_dataset_length=6", "data.max_length=96", f"data.cache_dir={tmp_path}/c",
        "training.max_epochs=2", "training.batch_size=1", "training.accumulative_counts=1", "training.lr=1e-3",
        "training.warmup_ratio=0", "training.gradient_checkpointing=false",
        "evaluation.max_new_tokens=12", "evaluation.every_n_steps=null"])
    work = tmp_path / "work"
    result = train(cfg, work_dir=work, progress=False)
    out = capsys.readouterr().out
    rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == result.steps
    # the same packed rows in both epochs: the second pass over them has a lower mean loss
    epoch1 = [r["loss"] for r in rows if r["epoch"] == 1]
    epoch2 = [r["loss"] for r in rows if r["epoch"] == 2]
    assert len(epoch1) == len(epoch2) > 0
    assert sum(epoch2) / len(epoch2) < sum(epoch1) / len(epoch1) - 0.1, (epoch1, epoch2)
    assert (work / "loss.png").stat().st_size > 0
    assert "evaluation at step 0" in out and f"evaluation at step {result.steps}" in out
    assert (work / "eval_outputs" / "step_0.txt").exists()
    assert (work / "epoch_1.pth" / "adapter_model.safetensors").exists()
    assert (work / "epoch_2.pth" / "adapter_model.safetensors").exists()


PAIRS = Path(__file__).resolve().parents[2] / "examples" / "data" / "preference_pairs.jsonl"


def test_smollm2_dpo_raises_held_out_preference_accuracy(smollm2_path, tmp_path):
    """The shipped DPO recipe, shortened. On held-out pairs, DPO's preference accuracy (chosen reward above
    rejected reward; every pair ties at 0 before the first step) passes one half, the DPO loss falls below log 2,
    and the model's own gap between the chosen and the rejected answer (mean log-probability per token) widens."""
    from tunesmith.config import load_config
    from tunesmith.train import train

    cfg, _ = load_config("smollm2_135m_instruct_lora_preference_dpo_e1", [
        f"data.path={PAIRS}", "data.max_dataset_length=64", "data.validation=0.25", "data.max_length=64",
        f"data.cache_dir={tmp_path}/c", "training.max_steps=2", "training.batch_size=8",
        "training.accumulative_counts=1", "training.lr=1e-3", "training.warmup_ratio=0",
        "training.gradient_checkpointing=false", "evaluation.inputs=[]", "logging.plot=false",
        "logging.report_to=[]"])
    work = tmp_path / "work"
    train(cfg, work_dir=work, progress=False)
    rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    before, after = rows[0], rows[-1]
    assert before["step"] == 0 and after["step"] == 2
    assert before["val_reward_accuracy"] == 0.0 and after["val_reward_accuracy"] > 0.5, (before, after)
    assert after["val_loss"] < before["val_loss"] == pytest.approx(0.6931, abs=1e-3)
    assert after["val_preference_margin"] > before["val_preference_margin"], (before, after)
