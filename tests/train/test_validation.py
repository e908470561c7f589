"""Validation during training (data.validation, val_loss / val_ppl, training.save_best), the trackers of
logging.report_to read back with each library's own reader, and the loss plot."""

from __future__ import annotations

import json
import shutil

import pytest

from tunesmith.errors import TunesmithError


def _val_run_cfg(make_cfg, **extra):
    sections = {"data": {"validation": 0.2}, "training": {"save_best": True, "max_epochs": 3, "save_steps": 10,
                                                          "save_total_limit": None},
                "evaluation": {"inputs": [], "every_n_steps": 2},
                "logging": {"report_to": ["tensorboard", "wandb", "mlflow"]}}
    for key, value in extra.items():
        sections.setdefault(key, {}).update(value)
    return make_cfg(**sections)


@pytest.fixture(scope="module")
def val_run(tmp_path_factory, train_model_dir, train_data_file, monkeypatch_module):
    """One tiny overfit-able run with a held-out fifth, save_best and every tracker (shared by the tests below)."""
    from tests.train.conftest import tiny_config
    from tunesmith.train import train

    monkeypatch_module.delenv("WANDB_MODE", raising=False)
    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path_factory.mktemp("val_run")

    def make_cfg(**sections):
        return tiny_config(train_model_dir, train_data_file, root / "cache", **sections)

    cfg = _val_run_cfg(make_cfg)
    result = train(cfg, work_dir=root / "work", progress=False)
    records = [json.loads(line) for line in (root / "work" / "metrics.jsonl").read_text().splitlines()]
    return cfg, result, records, make_cfg


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


# ----------------------------------------------------------------------------------------- the split
def test_validation_split_is_held_out_reproducible_and_keyed(make_cfg, train_model_dir, tmp_path):
    from tunesmith.data.dataset import TRAIN, VALIDATION, cache_key, tokenize_dataset
    from tunesmith.models import load_tokenizer

    tok = load_tokenizer(train_model_dir)
    rows = [{"conversation": [{"input": f"question {i % 12}", "output": f"answer number {i % 12}"}]}
            for i in range(24)]  # every conversation twice: the held-out copies must leave training too
    data = tmp_path / "dup.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = make_cfg(data={"path": str(data), "validation": 0.25})
    train_s, train_stats = tokenize_dataset(cfg, tok)
    val_s, _ = tokenize_dataset(cfg, tok, part=VALIDATION)
    assert len(val_s) == 6
    contents = {tuple(s.input_ids.tolist()) for s in train_s}
    assert contents.isdisjoint(tuple(s.input_ids.tolist()) for s in val_s)
    assert len(train_s) + len(val_s) < 24 and train_stats.dropped.get("same as a validation conversation")
    again, hit = tokenize_dataset(cfg, tok, part=VALIDATION)  # from the cache, the same conversations
    assert hit.cache_hit and [s.input_ids.tolist() for s in again] == [s.input_ids.tolist() for s in val_s]
    keys = {cache_key(cfg, tok, TRAIN), cache_key(cfg, tok, VALIDATION),
            cache_key(make_cfg(data={"path": str(data)}), tok),
            cache_key(make_cfg(data={"path": str(data), "validation": 0.25}, training={"seed": 1}), tok),
            cache_key(make_cfg(data={"path": str(data), "validation": 0.3}), tok)}
    assert len(keys) == 5  # part, fraction and seed all change the key
    reseeded = tokenize_dataset(make_cfg(data={"path": str(data), "validation": 0.25}, training={"seed": 1}), tok,
                                part=VALIDATION)[0]
    assert [s.input_ids.tolist() for s in reseeded] != [s.input_ids.tolist() for s in val_s]


def test_validation_file_and_config_errors(make_cfg, train_model_dir, train_data_file, tmp_path):
    from tunesmith.config import load_config
    from tunesmith.data.dataset import VALIDATION, cache_key, tokenize_dataset
    from tunesmith.models import load_tokenizer

    tok = load_tokenizer(train_model_dir)
    cfg = make_cfg(data={"validation": str(train_data_file)})
    assert cache_key(cfg, tok) == cache_key(make_cfg(), tok)  # training data beside a file: the same cache
    assert len(tokenize_dataset(cfg, tok, part=VALIDATION)[0]) == 40
    with pytest.raises(TunesmithError, match="does not exist"):
        tokenize_dataset(make_cfg(data={"validation": str(tmp_path / "nope.jsonl")}), tok, part=VALIDATION)
    with pytest.raises(TunesmithError, match="save_best"):
        load_config("internlm_chat_7b_qlora_oasst1_e3", ["training.save_best=true"])
    with pytest.raises(TunesmithError, match="between 0 and 1"):
        load_config("internlm_chat_7b_qlora_oasst1_e3", ["data.validation=1.5"])
    cfg, _ = load_config("internlm_chat_7b_qlora_oasst1_e3", ["data.validation=0.1", "training.save_best=true"])
    assert cfg.data.validation == 0.1 and cfg.evaluation.validation_interval() == cfg.evaluation.every_n_steps


# ----------------------------------------------------------------------------------------- the run
def test_val_loss_decreases_and_best_is_the_argmin(val_run):
    cfg, result, records, _ = val_run
    val = [(r["step"], r["val_loss"], r["val_ppl"]) for r in records if "val_loss" in r]
    steps = [s for s, _, _ in val]
    assert steps[0] == 0 and steps[-1] == result.total_steps and all(s % 2 == 0 for s in steps[1:-1])
    losses = [v for _, v, _ in val]
    assert losses[-1] < losses[0] - 0.1
    assert all(b <= a + 1e-3 for a, b in zip(losses, losses[1:]))
    assert all(abs(ppl - __import__("math").exp(v)) < 1e-6 * ppl for _, v, ppl in val)
    trained = [(v, s) for s, v, _ in val if s > 0]
    best_loss, best_step = min(trained)
    meta = json.loads((result.work_dir / "best.pth" / "meta.json").read_text())
    state = json.loads((result.work_dir / "best.pth" / "trainer_state.json").read_text())
    assert meta["step"] == best_step and state["best_val_loss"] == pytest.approx(best_loss)
    assert result.best_checkpoint == result.work_dir / "best.pth" and result.best_val_loss == pytest.approx(best_loss)
    assert (result.work_dir / "last_checkpoint").read_text().strip().endswith("epoch_3.pth")
    log = (result.work_dir / "train.log").read_text()
    assert "validation before training: val_loss" in log and " val_ppl " in log and "saved" in log


def test_resume_keeps_the_best_so_far(val_run, tmp_path):
    from tunesmith.train import train

    cfg, result, _, _ = val_run
    work = tmp_path / "work"
    shutil.copytree(result.work_dir, work, ignore=shutil.ignore_patterns("wandb", "mlruns"))
    # make the best so far at step 10 unbeatable: a resumed run that restores it saves no new best.pth
    state_file = work / "iter_10.pth" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["best_step"] == 10 and state["best_val_loss"] is not None
    state["best_val_loss"] = 0.5
    state_file.write_text(json.dumps(state))
    before = (work / "best.pth" / "meta.json").read_text()
    resumed = train(cfg.model_copy(update={"logging": cfg.logging.model_copy(update={"report_to": []})}),
                    work_dir=work, resume=work / "iter_10.pth", progress=False)
    assert resumed.best_val_loss == 0.5 and (work / "best.pth" / "meta.json").read_text() == before
    assert "saved" in (work / "train.log").read_text() and "best.pth (val_loss" not in \
        (work / "train.log").read_text().split("--resume")[-1]


# ----------------------------------------------------------------------------------------- trackers
def test_trackers_read_back_with_their_own_readers(val_run):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.train.wandb_reader import config as wandb_config
    from tests.train.wandb_reader import history as wandb_history

    _, result, records, _ = val_run
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    train_loss = {r["step"]: r["loss"] for r in records if "loss" in r}

    acc = EventAccumulator(str(result.work_dir / "tensorboard"))
    acc.Reload()
    assert {e.step: e.value for e in acc.Scalars("val/loss")} == pytest.approx(val)
    assert {e.step: e.value for e in acc.Scalars("train/loss")} == pytest.approx(train_loss)

    client = MlflowClient(tracking_uri=(result.work_dir / "mlruns").as_uri())
    exp = client.get_experiment_by_name("tunesmith")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.params["config.training.lr"] == "0.003" and "fast_paths.compiled" in run.data.params
    assert run.data.params["environment.torch"] and run.info.status == "FINISHED"
    assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/loss")} == pytest.approx(val)
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == len(train_loss)

    (log_file,) = (result.work_dir / "wandb").glob("offline-run-*/run-*.wandb")
    rows = wandb_history(log_file)
    assert {r["_step"]: r["val/loss"] for r in rows if "val/loss" in r} == pytest.approx(val)
    assert {r["_step"]: r["train/loss"] for r in rows if "train/loss" in r} == pytest.approx(train_loss)
    params = wandb_config(log_file)
    assert params["config.data.validation"] == "0.2" and "environment.torch" in params


def test_missing_tracker_is_one_line_before_anything_slow(make_cfg, tmp_path, monkeypatch):
    from tunesmith.train import trackers, train

    monkeypatch.setitem(trackers.PACKAGES, "wandb", "tunesmith_no_such_package")
    with pytest.raises(TunesmithError, match="asks for wandb, which is not installed") as info:
        train(make_cfg(logging={"report_to": ["wandb"]}), work_dir=tmp_path / "w", progress=False)
    assert "tunesmith[wandb]" in info.value.hint and not (tmp_path / "w").exists()


def test_report_to_and_the_tensorboard_switch(make_cfg):
    assert make_cfg(logging={"report_to": ["mlflow"], "tensorboard": None}).logging.trackers() == ["mlflow"]
    assert make_cfg().logging.trackers() == ["tensorboard"]  # conftest: tensorboard: true
    assert make_cfg(logging={"tensorboard": False}).logging.trackers() == []
    # a copied config lists tensorboard; `--set logging.tensorboard=false` still turns it off
    assert make_cfg(logging={"report_to": ["tensorboard", "mlflow"], "tensorboard": False}).logging.trackers() == [
        "mlflow"]


# ----------------------------------------------------------------------------------------- the plot
def test_loss_plot_artists(val_run):
    from matplotlib.ticker import MaxNLocator

    from tunesmith.train.metrics import EMA_WEIGHT, ema, loss_figure

    _, result, records, _ = val_run
    assert (result.work_dir / "loss.png").stat().st_size > 10_000
    fig = loss_figure(records, "run")
    ax, lr_ax = fig.axes
    raw, smooth, points = ax.get_lines()
    assert raw.get_alpha() < 0.5 and smooth.get_linewidth() > raw.get_linewidth()
    assert list(smooth.get_ydata()) == pytest.approx(ema([r["loss"] for r in records if "loss" in r]))
    assert points.get_linestyle() == "None" and points.get_marker() == "o"
    assert list(points.get_xdata()) == [r["step"] for r in records if "val_loss" in r]
    assert lr_ax.get_ylabel() == "learning rate" and len(lr_ax.get_lines()) == 1
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [f"loss (EMA {EMA_WEIGHT})", "validation loss", "learning rate"]
    assert isinstance(ax.xaxis.get_major_locator(), MaxNLocator)
    assert ax.get_title().startswith("run: validation loss") and "best" in ax.get_title()
    no_val = loss_figure([{k: v for k, v in r.items() if not k.startswith("val_")} for r in records if "loss" in r])
    assert no_val.axes[0].get_title().startswith("loss (EMA)") and loss_figure([]) is None
