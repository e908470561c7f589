"""Where training numbers go: `metrics.jsonl`, TensorBoard events and `loss.png` (the console and `train.log`
are runlog.py's).

Only rank 0 writes (construct with ``enabled=False`` elsewhere). On resume the JSONL is cut back to the
checkpoint's step, so the file (and the plot) read like one uninterrupted run.
"""

from __future__ import annotations

import json
import time
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


class MetricsWriter:
    def __init__(self, work_dir: Path, *, enabled: bool = True, tensorboard: bool = True, plot: bool = True,
                 resume_step: int | None = None):
        self.work_dir = Path(work_dir)
        self.enabled, self.plot_enabled = enabled, plot
        self.path = self.work_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("", encoding="utf-8")
        else:
            kept = [r for r in self.records() if int(r.get("step", 0)) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.work_dir / "tensorboard"), purge_step=resume_step)
            except ImportError:  # tensorboard not installed: JSONL and plot still work
                self.tb = None

    def records(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(f"train/{key}", value, step)
            self.tb.flush()

    def plot(self) -> Path | None:
        """Draw work_dir/loss.png (loss and lr against the step)."""
        if not (self.enabled and self.plot_enabled):
            return None
        rows = [r for r in self.records() if "loss" in r]
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in rows]
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
        ax.plot(steps, [r["loss"] for r in rows], color="tab:blue", label="loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (token-weighted)")
        ax.grid(alpha=0.3)
        if "lr" in rows[0]:
            ax2 = ax.twinx()
            ax2.plot(steps, [r["lr"] for r in rows], color="tab:orange", alpha=0.6, label="lr")
            ax2.set_ylabel("learning rate")
        ax.set_title(f"{self.work_dir.name}: loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}")
        fig.tight_layout()
        out = self.work_dir / "loss.png"
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        return out

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None

