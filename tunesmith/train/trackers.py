"""Experiment trackers (`logging.report_to`, which `LoggingSection.trackers()` resolves): TensorBoard, Weights &
Biases and MLflow. Each gets every metrics record metrics.py writes (``train/<key>`` and ``val/<key>`` by step);
W&B and MLflow also get the run's parameters (the config, the environment record and the fast paths, flattened
to ``config.training.lr``, ``environment.torch``, ``fast_paths.compiled``, ...).

- tensorboard: events in ``work_dir/tensorboard`` (a resumed run purges the steps after its checkpoint).
- wandb: offline unless ``WANDB_MODE`` is set (``WANDB_MODE=online`` after ``wandb login`` syncs as it runs;
  an offline run is kept in ``work_dir/wandb`` for ``wandb sync``); project ``WANDB_PROJECT`` or ``tunesmith``.
- mlflow: a local file store in ``work_dir/mlruns`` unless ``MLFLOW_TRACKING_URI`` is set (MLflow 3 wants
  ``MLFLOW_ALLOW_FILE_STORE=true`` for a file store; the default sets it for this process); experiment
  ``MLFLOW_EXPERIMENT_NAME`` or ``tunesmith``.

A resumed run starts a new W&B / MLflow run (named like the first) from the checkpoint's step.
`check_trackers` fails in one line, before anything slow, when a tracker's package is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from tunesmith.config.load import flat_settings
from tunesmith.errors import TunesmithError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_trackers(names: list[str]) -> None:
    for name in names:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            extra = "" if name == "tensorboard" else f"'tunesmith[{name}]' (or pip install {name})"
            raise TunesmithError(f"logging.report_to asks for {name}, which is not installed",
                                 f"pip install {extra or 'tensorboard'}, or take {name} out of logging.report_to")


def flatten(params: dict[str, Any]) -> dict[str, str]:
    """Nested parameters as ``a.b.c -> text`` (config.load.flat_settings' keys; lists and numbers as JSON)."""
    return {key: value if isinstance(value, str) else json.dumps(value, default=str)
            for key, value in flat_settings(params).items()}


def scalars(values: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics record under their tracker names: ``val_loss -> val/loss``, ``loss -> train/loss``."""
    out = {}
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"] = float(value)
    return out


class TensorBoard:
    def __init__(self, work_dir: Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(work_dir / "tensorboard"), purge_step=resume_step)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, work_dir: Path, name: str, params: dict[str, Any]):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "tunesmith"), name=name, dir=str(work_dir),
                              mode=os.environ.get("WANDB_MODE") or "offline", config=flatten(params),
                              reinit="create_new",
                              settings=wandb.Settings(console="off", silent=True, x_disable_stats=True,
                                                      disable_git=True, save_code=False))

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, work_dir: Path, name: str, params: dict[str, Any]):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # MLflow 3.x keeps its file store in maintenance mode behind this opt-in; it still reads fine
            uri = (work_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "tunesmith")
        found = self.client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(exp_id, run_name=name).info.run_id
        flat = [Param(k, v[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(flat), 100):  # the store takes at most 100 parameters per call
            self.client.log_batch(self.run_id, params=flat[i:i + 100])

    def log(self, step: int, values: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def open_trackers(names: list[str], work_dir: Path, *, name: str, params: dict[str, Any],
                  resume_step: int | None) -> list[Any]:
    """The trackers of ``names`` (see `check_trackers`), each with ``log(step, scalars)`` and ``close()``."""
    check_trackers(names)
    out: list[Any] = []
    for tracker in names:
        if tracker == "tensorboard":
            out.append(TensorBoard(work_dir, resume_step))
        elif tracker == "wandb":
            out.append(WandB(work_dir, name, params))
        elif tracker == "mlflow":
            out.append(MLflow(work_dir, name, params))
    return out
