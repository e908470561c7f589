"""What a person reads about a run: the console and ``work_dir/train.log``.

Every line the loop prints goes to both, flushed as it is printed (``tail -f`` follows it live): the start-up
lines (config name, data summary, fast paths, work dir), one step line per ``training.log_interval`` steps (and
the first and last), evaluation answers, ``saved ...`` for each checkpoint, and the final summary. A step line::

    step 20/200 epoch 1 loss 1.2345 lr 1.998e-04 grad_norm 0.5123 tok/s 1234 mem 3.21GiB elapsed 0:01:02 ETA 0:09:18

A step with a validation loss (``data.validation``) always gets its line, with ``val_loss 1.3012 val_ppl 3.674``
(and ``best`` when ``training.save_best`` kept it) before the times; the validation before the first step has a
line of its own (`validation_line`). Preference runs (DPO / ORPO) add ``acc 0.750 margin 0.4321`` (the reward
accuracy and margin) after the loss, and their validation shows ``val_acc`` / ``val_margin`` / ``val_pref_acc``
instead of a perplexity.

On a terminal (and with progress on) the console shows one live bar made of that same line instead of the step
lines; without one (``nohup tunesmith train CFG > out.log 2>&1 &``) step lines are plain text, no colours, no
carriage returns. The file gets the step lines either way. Only rank 0 prints and writes. A fresh run starts
``train.log`` anew; a resumed one (``--resume``) appends to it. A run stopped by an error notes it in the file
(the console already shows the error).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, TextIO

from tunesmith.errors import TunesmithError
from tunesmith.progress import eta, format_duration, is_terminal

LOG_NAME = "train.log"


def step_line(step: int, total: int, epoch: int, values: dict[str, Any], *, elapsed: float,
              eta_seconds: float | None) -> str:
    """The numbers of one optimizer step as the terminal bar and the plain log show them."""
    parts = [f"step {step}/{total}", f"epoch {epoch}", f"loss {values['loss']:.4f}", f"lr {values['lr']:.3e}"]
    if "reward_accuracy" in values:
        parts.append(f"acc {values['reward_accuracy']:.3f} margin {values['reward_margin']:.4f}")
    if values.get("grad_norm") is not None:
        parts.append(f"grad_norm {values['grad_norm']:.4f}")
    parts.append(f"tok/s {values.get('tokens_per_s', 0):.0f}")
    if values.get("memory_gb") is not None:
        parts.append(f"mem {values['memory_gb']:.2f}GiB")
    if "val_loss" in values:
        parts.append(validation_line(values))
    parts += [f"elapsed {format_duration(elapsed)}", f"ETA {format_duration(eta_seconds)}"]
    return " ".join(parts)


def validation_line(values: dict[str, Any]) -> str:
    """``val_loss 1.3012 val_ppl 3.674`` (``best`` added when values say so); preference runs:
    ``val_loss 0.6931 val_acc 0.500 val_margin 0.0000 val_pref_acc 0.550``."""
    if "val_reward_accuracy" in values:
        numbers = (f"val_loss {values['val_loss']:.4f} val_acc {values['val_reward_accuracy']:.3f} "
                   f"val_margin {values['val_reward_margin']:.4f} val_pref_acc {values['val_preference_accuracy']:.3f}")
    else:
        numbers = f"val_loss {values['val_loss']:.4f} val_ppl {values['val_ppl']:.3f}"
    return numbers + (" best" if values.get("best") else "")


class RunLog:
    """The run's console and ``train.log``. ``work_dir=None`` (ranks other than 0): prints and writes nothing.
    ``progress``: a live bar during the steps when stdout is a terminal. ``start_time``: ``time.perf_counter()``
    when the run began (the step lines' elapsed time counts from it)."""

    def __init__(self, work_dir: Path | None, *, append: bool, progress: bool, interval: int, start_time: float):
        self.enabled = work_dir is not None
        self.interval, self.start_time = interval, start_time
        self.file: TextIO | None = None
        self.bar: Any = None
        self.want_bar = self.enabled and progress and is_terminal()
        self.total = self.first_step = 0
        self.clock = start_time
        if work_dir is not None:
            self.path = Path(work_dir) / LOG_NAME
            self.file = self.path.open("a" if append else "w", encoding="utf-8")

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if exc is not None and not isinstance(exc, SystemExit):
            self.stop_bar()
            what = str(exc) if isinstance(exc, TunesmithError) or not str(exc) else f"{kind.__name__}: {exc}"
            self.print(f"error: {what or kind.__name__}", console=False)
        self.close()

    def print(self, text: str, *, console: bool = True) -> None:
        if not self.enabled:
            return
        if console:
            if self.bar is not None:
                self.bar.console.print(text, markup=False, highlight=False)
            else:
                print(text, flush=True)
        if self.file is not None:
            self.file.write(text + "\n")
            self.file.flush()

    # ----------------------------------------------------------------------------------------- the steps
    def start_steps(self, total: int, start_step: int) -> None:
        """The loop begins at ``start_step`` of ``total``: the ETA counts from here, the bar (if any) appears."""
        self.total, self.first_step, self.clock = total, start_step, time.perf_counter()
        if self.want_bar:
            from rich.progress import BarColumn, Progress, TextColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), TextColumn("{task.description}", markup=False))
            self.task = self.bar.add_task(f"step {start_step}/{total}", total=total, completed=start_step)
            self.bar.start()

    def step(self, step: int, epoch: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        line = step_line(step, self.total, epoch, values, elapsed=now - self.start_time,
                         eta_seconds=eta(now - self.clock, step - self.first_step, self.total - step))
        if self.bar is not None:
            self.bar.update(self.task, completed=step, description=line)
        if step % self.interval == 0 or step in (1, self.first_step + 1, self.total) or "val_loss" in values:
            self.print(line, console=self.bar is None)

    def stop_bar(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def close(self) -> None:
        self.stop_bar()
        if self.file is not None:
            self.file.close()
            self.file = None
