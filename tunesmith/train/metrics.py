"""Where training numbers go: `metrics.jsonl`, the trackers of `logging.report_to` (TensorBoard, W&B, MLflow;
trackers.py) and `loss.png` (the console and `train.log` are runlog.py's).

Only rank 0 writes (construct with ``enabled=False`` elsewhere). On resume the JSONL is cut back to the
checkpoint's step, so the file (and the plot) read like one uninterrupted run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunesmith.files import atomic_path


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (none when it is not there), without a last line a kill cut short or a
    writer has not finished."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


EMA_WEIGHT = 0.9  # the plot's smoothing: TensorBoard's slider at 0.9


def ema(values: list[float], weight: float = EMA_WEIGHT) -> list[float]:
    """Exponential moving average, debiased as TensorBoard's smoothing (the first points are not pulled to 0)."""
    out, last, norm = [], 0.0, 0.0
    for v in values:
        last = weight * last + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(last / norm)
    return out


def loss_figure(records: list[dict[str, Any]], name: str = ""):
    """The run's plot as a matplotlib Figure: the training loss smoothed (EMA, `EMA_WEIGHT`) over the raw steps
    drawn faint, the validation loss as points, the learning rate on its own right axis, one legend, integer
    step ticks; the title compares the first and last validation loss when there is one, else the smoothed
    training loss at the start and the end. Preference runs (DPO / ORPO) get a second panel: the reward accuracy and
    margin (`_preference_axes`). None when there is nothing to draw."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    if not train and not val:
        return None
    preference = any("reward_accuracy" in r or "val_reward_accuracy" in r for r in records)
    fig = Figure(figsize=(8, 7.5 if preference else 4.5), dpi=100)
    ax = fig.add_subplot(2, 1, 1) if preference else fig.add_subplot()
    handles = []
    if train:
        steps, raw = [r["step"] for r in train], [r["loss"] for r in train]
        smooth = ema(raw)
        ax.plot(steps, raw, color="tab:blue", alpha=0.25, linewidth=1, label="loss (each step)")
        handles += ax.plot(steps, smooth, color="tab:blue", linewidth=2, label=f"loss (EMA {EMA_WEIGHT})")
    if val:
        handles += ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o", color="tab:red",
                           label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean per pair)" if preference else "loss (token-weighted)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    lr_rows = [r for r in train if "lr" in r]
    if lr_rows:
        ax2 = ax.twinx()
        handles += ax2.plot([r["step"] for r in lr_rows], [r["lr"] for r in lr_rows], color="tab:orange",
                            alpha=0.7, linestyle="--", label="learning rate")
        ax2.set_ylabel("learning rate")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax.legend(handles=handles, loc="upper right", fontsize="small")
    if val:
        best = min(val, key=lambda r: r["val_loss"])
        title = (f"validation loss {val[0]['val_loss']:.3f} (step {val[0]['step']}) -> {val[-1]['val_loss']:.3f} "
                 f"(step {val[-1]['step']}); best {best['val_loss']:.3f} at step {best['step']}")
    else:
        title = f"loss (EMA) {smooth[0]:.3f} -> {smooth[-1]:.3f} over {steps[-1]} steps"
    ax.set_title(f"{name}: {title}" if name else title, fontsize="medium")
    if preference:
        _preference_axes(fig.add_subplot(2, 1, 2, sharex=ax), records)
    fig.tight_layout()
    return fig


def _preference_axes(ax, records: list[dict[str, Any]]) -> None:
    """DPO / ORPO runs: the reward accuracy (EMA) and margin of the training steps, the validation's reward and
    preference accuracies as points."""
    train = [r for r in records if "reward_accuracy" in r]
    if train:
        steps = [r["step"] for r in train]
        ax.plot(steps, ema([r["reward_accuracy"] for r in train]), color="tab:green", linewidth=2,
                label=f"reward accuracy (EMA {EMA_WEIGHT})")
        margin = ax.twinx()
        margin.plot(steps, ema([r["reward_margin"] for r in train]), color="tab:purple", linestyle="--",
                    label="reward margin (EMA, right axis)")
        margin.set_ylabel("reward margin")
        margin.legend(loc="lower right", fontsize="small")
    for key, style, label in (("val_reward_accuracy", "s", "validation reward accuracy"),
                              ("val_preference_accuracy", "o", "validation preference accuracy")):
        val = [r for r in records if key in r]
        if val:
            ax.plot([r["step"] for r in val], [r[key] for r in val], style, label=label)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize="small")


class MetricsWriter:
    """metrics.jsonl, the trackers of ``report_to`` (trackers.py) and loss.png. ``params``: what W&B and MLflow
    record as the run's parameters (config, environment, fast paths)."""

    def __init__(self, work_dir: Path, *, enabled: bool = True, report_to: Sequence[str] = ("tensorboard",),
                 plot: bool = True, resume_step: int | None = None, params: dict[str, Any] | None = None):
        self.work_dir = Path(work_dir)
        self.enabled, self.plot_enabled = enabled, plot
        self.path = self.work_dir / "metrics.jsonl"
        self.trackers: list[Any] = []
        if not enabled:
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("", encoding="utf-8")
        else:
            kept = [r for r in self.records() if int(r.get("step", 0)) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        from tunesmith.train.trackers import open_trackers

        self.trackers = open_trackers(list(report_to), self.work_dir, name=self.work_dir.name, params=params or {},
                                      resume_step=resume_step)

    def records(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def log(self, step: int, values: dict[str, Any]) -> None:
        """One record: training numbers (``loss``, ``lr``, ...) and / or validation ones (``val_loss``, ...)."""
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.trackers:
            from tunesmith.train.trackers import scalars

            numbers = scalars(values)
            for tracker in self.trackers:
                tracker.log(step, numbers)

    def plot(self) -> Path | None:
        """Draw work_dir/loss.png (see `loss_figure`)."""
        if not (self.enabled and self.plot_enabled):
            return None
        fig = loss_figure(self.records(), self.work_dir.name)
        if fig is None:
            return None
        out = self.work_dir / "loss.png"
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format="png")
        return out

    def close(self) -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close()
