"""Preference tuning (train/preference.py, train/reference.py): DPO and ORPO losses equal to hand-written
references on a tiny model (values 1e-6 and gradients), pair-weighted accumulation, and tiny runs through the
real loop: the adapter-off reference, the precomputed one (full fine-tuning) kept for a resume, and pth_to_hf of a
DPO checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.models.fast.helpers import grads, lora, tiny_llama
from tests.models.fast.test_logps import by_hand, pair_batch
from tunesmith.config.schema import PreferenceSection
from tunesmith.train.preference import PreferenceLoss, dpo_losses, log_odds, summarize


def _model():
    return lora(tiny_llama()).double()


def _hand_dpo(model, samples, beta, eps, sft_weight):
    policy = by_hand(model, samples).double()
    with model.disable_adapter(), torch.no_grad():
        ref = by_hand(model, samples).double()
    losses = []
    for k in range(len(samples) // 2):
        c, r, c0, r0 = policy[2 * k], policy[2 * k + 1], ref[2 * k], ref[2 * k + 1]
        z = beta * ((c - c0) - (r - r0))
        nll = -c / (len(samples[2 * k].input_ids) - 3)
        losses.append(-(1 - eps) * torch.nn.functional.logsigmoid(z) - eps * torch.nn.functional.logsigmoid(-z)
                      + sft_weight * nll)
    return torch.stack(losses).sum()


@pytest.mark.parametrize(("beta", "eps", "sft_weight"), [(0.1, 0.0, 0.0), (0.5, 0.2, 0.3)])
def test_dpo_loss_and_gradients_equal_a_hand_written_reference(beta, eps, sft_weight):
    model = _model()
    batch, samples = pair_batch()
    options = PreferenceSection(beta=beta, label_smoothing=eps, sft_weight=sft_weight)
    module = PreferenceLoss(model, "dpo", options, "adapter_off", {"chunked": True, "chunk_size": 5})
    loss, pairs = module(batch)
    assert int(pairs) == 3
    loss.backward()
    ours = grads(model)
    model.zero_grad(set_to_none=True)
    expected = _hand_dpo(model, samples, beta, eps, sft_weight)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), atol=1e-6, rtol=0)
    for name, grad in grads(model).items():
        torch.testing.assert_close(ours[name], grad, atol=1e-6, rtol=1e-6, msg=name)
    stats = summarize({k: float(v) for k, v in module.take_stats().items()})
    assert 0.0 <= stats["reward_accuracy"] <= 1.0 and module.take_stats() == {}


def test_orpo_loss_and_gradients_equal_a_hand_written_reference():
    model = _model()
    batch, samples = pair_batch()
    module = PreferenceLoss(model, "orpo", PreferenceSection(orpo_lambda=0.25), "adapter_off", {"chunk_size": 4})
    loss, _ = module(batch)
    loss.backward()
    ours = grads(model)
    model.zero_grad(set_to_none=True)
    policy = by_hand(model, samples).double()
    expected = 0.0
    for k in range(3):
        n_c, n_r = len(samples[2 * k].input_ids) - 3, len(samples[2 * k + 1].input_ids) - 3
        a_c, a_r = policy[2 * k] / n_c, policy[2 * k + 1] / n_r
        odds_c = a_c - torch.log(1 - torch.exp(a_c))  # log(p / (1 - p)) written out
        odds_r = a_r - torch.log(1 - torch.exp(a_r))
        expected = expected - a_c - 0.25 * torch.nn.functional.logsigmoid(odds_c - odds_r)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), atol=1e-6, rtol=0)
    for name, grad in grads(model).items():
        torch.testing.assert_close(ours[name], grad, atol=1e-6, rtol=1e-6, msg=name)


def test_reference_equal_to_policy_gives_log_two_and_zero_rewards():
    c = torch.tensor([-3.0, -7.5])
    r = torch.tensor([-4.0, -2.0])
    losses, chosen, rejected = dpo_losses(c, r, c, r, beta=0.1)
    torch.testing.assert_close(losses, torch.full((2,), math.log(2)))
    assert chosen.abs().max() == 0 and rejected.abs().max() == 0
    assert torch.isfinite(log_odds(torch.tensor([0.0, -1e-9, -50.0]))).all()  # p = 1 does not blow up


def test_precomputed_reference_in_the_batch_replaces_the_adapter_off_forward():
    model = _model()
    batch, samples = pair_batch()
    options = PreferenceSection()
    live = PreferenceLoss(model, "dpo", options, "adapter_off")(batch)[0]
    with torch.no_grad(), model.disable_adapter():
        batch["reference_logps"] = by_hand(model, samples).float()
    stored = PreferenceLoss(model, "dpo", options, "precomputed")(batch)[0]
    torch.testing.assert_close(stored, live, atol=1e-5, rtol=1e-6)
    del batch["reference_logps"]
    with pytest.raises(ValueError, match="no precomputed reference"):
        PreferenceLoss(model, "dpo", options, "precomputed")(batch)


def test_accumulation_weights_every_pair_alike():
    """Two micro-batches of 1 and 2 pairs give the gradient of one batch of 3 (the mean over pairs)."""
    from tunesmith.train.step import LocalBackend, TrainStep

    model = _model().float()
    module = PreferenceLoss(model, "dpo", PreferenceSection(), "adapter_off")
    params = [p for p in model.parameters() if p.requires_grad]
    whole, _ = pair_batch(lengths=((6, 9), (7, 5), (4, 8)), rows_packed=False)  # one pair a row
    first = {k: (v[:1] if torch.is_tensor(v) and v.dim() == 2 else v) for k, v in whole.items()}
    first.update(num_pairs=1, sequence_ids=whole["sequence_ids"][:1])
    second = {k: (v[1:] if torch.is_tensor(v) and v.dim() == 2 else v) for k, v in whole.items()}
    second.update(num_pairs=2, sequence_ids=whole["sequence_ids"][1:] - 2)
    for part in (first, second):
        part.pop("cu_seq_lens", None)
    whole.pop("cu_seq_lens", None)
    captured = []

    class Capture(torch.optim.SGD):
        def step(self, closure=None):
            captured.append([p.grad.clone() for p in params])

    step = TrainStep(LocalBackend(module, Capture(params, lr=0.0), params, precision="fp32",
                                  device=torch.device("cpu"), max_norm=None), torch.device("cpu"))
    one = step([whole])
    two = step([first, second])
    assert float(one.tokens) == float(two.tokens) == 3.0
    torch.testing.assert_close(one.loss, two.loss, atol=1e-6, rtol=1e-6)
    for a, b in zip(captured[0], captured[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert one.stats["pairs"] == two.stats["pairs"] == 3.0


# ----------------------------------------------------------------------------------------- through the loop
@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    rows = [{"prompt": f"question {i}", "chosen": f"good answer {i % 5} yes", "rejected": f"bad {i % 3} no no"}
            for i in range(24)]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _pref_cfg(make_cfg, pairs_file, objective="dpo", **sections):
    base = {"data": {"path": str(pairs_file), "format": "preference", "validation": 0.25},
            "training": {"objective": objective, "max_steps": 3, "max_epochs": 1},
            "evaluation": {"inputs": [], "every_n_steps": 2}}
    for key, value in sections.items():
        if isinstance(value, dict):
            base.setdefault(key, {}).update(value)
        else:
            base[key] = value
    return make_cfg(**base)


def _records(work):
    return [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]


def test_dpo_run_logs_rewards_and_starts_at_log_two(make_cfg, pairs_file, tmp_path):
    from tunesmith.train import train

    result = train(_pref_cfg(make_cfg, pairs_file), work_dir=tmp_path / "w", progress=False)
    records = _records(tmp_path / "w")
    first_val = records[0]
    assert first_val["step"] == 0 and first_val["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first_val["val_reward_accuracy"] == 0.0 and "val_ppl" not in first_val
    steps = [r for r in records if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # adapter B starts at zero: policy = reference
    assert {"reward_accuracy", "reward_margin", "logp_chosen", "preference_accuracy"} <= steps[-1].keys()
    assert result.steps == 3
    log = (tmp_path / "w" / "train.log").read_text()
    assert "val_acc" in log and " acc " in log and "margin" in log


def test_full_fine_tuning_precomputes_the_reference_and_resume_reads_it(make_cfg, pairs_file, tmp_path):
    from tunesmith.train import train

    cfg = _pref_cfg(make_cfg, pairs_file, method="full", training={"save_steps": 1})
    straight = train(cfg, work_dir=tmp_path / "a", progress=False)
    assert (tmp_path / "a" / "reference_logps.npy").exists()
    assert (tmp_path / "a" / "reference_logps.validation.npy").exists()
    assert straight.losses[0] == pytest.approx(math.log(2), abs=1e-5)
    (tmp_path / "b").mkdir()
    short = _pref_cfg(make_cfg, pairs_file, method="full", training={"save_steps": 1, "max_steps": 1})
    train(short, work_dir=tmp_path / "b", progress=False)
    resumed = train(cfg, work_dir=tmp_path / "b", resume="auto", progress=False)
    assert resumed.losses == pytest.approx(straight.losses[1:], abs=1e-6)


def test_orpo_run_and_its_checkpoint_converts(make_cfg, pairs_file, tmp_path):
    from tests.export.helpers import write_config
    from tunesmith.export.pth_to_hf import pth_to_hf
    from tunesmith.train import train

    cfg = _pref_cfg(make_cfg, pairs_file, objective="orpo")
    result = train(cfg, work_dir=tmp_path / "w", progress=False)
    assert all(math.isfinite(x) for x in result.losses)
    out = tmp_path / "hf"
    pth_to_hf(write_config(cfg, tmp_path / "cfg.yaml"), result.last_checkpoint, out)
    assert (out / "adapter_model.safetensors").exists()


def test_objective_and_format_must_agree(make_cfg, pairs_file, train_data_file):
    from tunesmith.data.dataset import validate_data_names
    from tunesmith.errors import TunesmithError

    with pytest.raises(TunesmithError, match="trains on preference pairs"):
        validate_data_names(make_cfg(training={"objective": "dpo"}))
    with pytest.raises(TunesmithError, match="holds preference pairs"):
        validate_data_names(make_cfg(data={"path": str(pairs_file), "format": "preference"}))


def test_a_new_run_in_a_used_work_dir_scores_the_reference_anew(make_cfg, pairs_file, tmp_path):
    """Only a resume reads reference_logps.npy back: a file left by another run (other data, another model) is
    replaced, so the first step starts from policy = reference (loss log 2)."""
    import numpy as np

    from tunesmith.train import train

    cfg = _pref_cfg(make_cfg, pairs_file, method="full", training={"max_steps": 1})
    work = tmp_path / "w"
    first = train(cfg, work_dir=work, progress=False)
    stale = np.load(work / "reference_logps.npy")
    np.save(work / "reference_logps.npy", stale - 5.0)  # what another run could have left there
    again = train(cfg, work_dir=work, progress=False)
    assert again.losses[0] == pytest.approx(math.log(2), abs=1e-5) == first.losses[0]
    np.testing.assert_allclose(np.load(work / "reference_logps.npy"), stale, atol=1e-5)
