"""Fitting compiled layers' activations before the first step (tunesmith/train/memory.py)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from tunesmith.data.pack import _Collate
from tunesmith.train import train
from tunesmith.train.memory import longest_batch, optimizer_state_bytes, planning_wanted


def test_optimizer_state_bytes_counts_what_the_first_step_will_allocate():
    params = [torch.nn.Parameter(torch.randn(10, 4)), torch.nn.Parameter(torch.randn(6, dtype=torch.bfloat16))]
    assert optimizer_state_bytes(params, "adamw") == 2 * (40 * 4 + 6 * 2)  # two moments, param dtype
    assert optimizer_state_bytes(params, "adamw_8bit") == 2 * 46
    assert optimizer_state_bytes(params, "paged_adamw_32bit") == 0  # outside the allocator's count
    # DeepSpeed: fp32 masters, moments and gradient partitions, split over the ranks
    assert optimizer_state_bytes(params, "adamw", deepspeed_stage=2, world_size=2) == 16 * 46 // 2


class _Rows(torch.utils.data.Dataset):
    def __init__(self, lengths):
        self.lengths = lengths

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        ids = torch.full((self.lengths[i],), i + 1)
        return {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(self.lengths[i])}


def test_longest_batch_holds_the_longest_rows():
    rows = _Rows([5, 12, 3, 9, 12, 1])
    batch = longest_batch(rows, DataLoader(rows, batch_size=3, collate_fn=_Collate(0, False)))
    assert batch["input_ids"].shape == (3, 12)
    assert sorted(int(r[0]) for r in batch["input_ids"]) == [2, 4, 5]  # rows 1, 4 (12 tokens) and 3 (9)


def test_planning_only_for_compiled_layers_on_cuda_with_checkpointing():
    from tunesmith.config.schema import SpeedSection
    from tunesmith.models.fast import plan_fast_paths

    speed = SpeedSection()
    on_cuda = plan_fast_paths(speed, packed=True, deepspeed_stage=0, device="cuda")
    on_cpu = plan_fast_paths(speed, packed=True, deepspeed_stage=0, device="cpu")
    assert planning_wanted(on_cuda, True)
    assert not planning_wanted(on_cuda, False)  # checkpointing off: nothing to fit
    assert not planning_wanted(on_cpu, True)
    assert not planning_wanted(plan_fast_paths(SpeedSection(compile="off"), packed=True, deepspeed_stage=0,
                                               device="cuda"), True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_training_fits_activations_and_matches_eager(make_cfg, tmp_path, capsys):
    def run(name, **speed):
        cfg = make_cfg(model={"dtype": "bf16"}, lora={"dropout": 0.0}, speed=speed,
                       training={"max_steps": 4, "deterministic": False, "mixed_precision": "bf16",
                                 "gradient_checkpointing": True},
                       evaluation={"inputs": []})
        return train(cfg, work_dir=tmp_path / name, progress=False).losses

    eager = run("eager", compile="off")
    assert "activation memory" not in capsys.readouterr().out
    compiled = run("compiled", compile="on")
    assert "compiled layers keep 100% of their activations, 0/2 layers checkpointed whole" in \
        capsys.readouterr().out  # a tiny model fits
    tight = run("tight", compile="on", memory_fraction=1e-6)
    assert "2/2 layers checkpointed whole" in capsys.readouterr().out
    assert compiled == pytest.approx(eager, abs=0.03)  # bf16, other kernels
    assert tight == pytest.approx(eager, abs=0.03)
