"""DPO's reference log-probabilities computed once, before the first step (``preference.reference: precomputed``,
the default for full fine-tuning, where switching an adapter off is not possible and a second copy of the model
would double its memory).

The model as it is before training scores every sequence of the training pairs (and of ``data.validation``'s),
one pair a row, without gradients, with the step's mixed precision; LoRA / QLoRA models score with their adapter
switched off. The numbers are written to the work dir (``reference_logps.npy``, ``reference_logps.validation.npy``:
float32, one per sequence in the dataset's sample order) and attached to the dataset, so each batch carries them as
``reference_logps``. A resumed run reads them back: the model it resumes is no longer the reference. Under several
processes every rank scores the whole set (the same numbers), and rank 0 writes the file.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from tunesmith.errors import TunesmithError
from tunesmith.files import atomic_path


def reference_file(work_dir: Path, part: str) -> Path:
    return work_dir / ("reference_logps.npy" if part == "train" else f"reference_logps.{part}.npy")


def compute_reference(module: Any, dataset: Any, *, batch_size: int, precision: str, device: torch.device,
                      host_inputs: tuple[str, ...] = ()) -> np.ndarray:
    """Every sequence's summed log-probability under the model as it is now (adapter off when it has one)."""
    from tunesmith.models.fast.logps import score_pairs
    from tunesmith.models.fast.lora import adapter_off
    from tunesmith.train.step import autocast_for

    model = module.model
    switch = adapter_off(model) if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with switch, autocast_for(precision, device):
        logps, _ = score_pairs(model, dataset.samples, batch_size=batch_size,
                               pad_id=dataset.pad_token_id, device=device,
                               host_inputs=host_inputs, **module.loss_options)
    return logps.astype(np.float32)


def attach_reference(module: Any, datasets: dict[str, Any], *, work_dir: Path, resumed: bool, is_main: bool,
                     batch_size: int, precision: str, device: torch.device, host_inputs: tuple[str, ...],
                     printer: Callable[[str], None]) -> None:
    """Give each dataset of ``datasets`` (part name -> PairDataset, or None) its reference log-probabilities: on
    resume read from the work dir, else computed now and written there (a new run in a used work dir scores anew:
    the file there may come from another model or other data)."""
    from tunesmith.train.distributed import barrier

    for part, dataset in datasets.items():
        if dataset is None:
            continue
        path = reference_file(work_dir, part)
        if resumed and path.exists():
            values = np.load(path, allow_pickle=False)
            if values.shape != (len(dataset.samples),):
                raise TunesmithError(f"{path} holds {values.shape[0]} reference log-probabilities, the data has "
                                     f"{len(dataset.samples)} sequences", "start a new run (another --work-dir)")
        elif resumed:
            raise TunesmithError(f"{path} is missing: a resumed DPO run needs the reference log-probabilities its "
                                 "first run computed", "restore the file, or start a new run")
        else:
            start = time.perf_counter()
            printer(f"DPO reference: scoring {dataset.num_pairs} {part} pairs with the model before training ...")
            values = compute_reference(module, dataset, batch_size=batch_size, precision=precision, device=device,
                                       host_inputs=host_inputs)
            if is_main:
                with atomic_path(path) as tmp:
                    with open(tmp, "wb") as fh:
                        np.save(fh, values, allow_pickle=False)
            barrier()
            printer(f"DPO reference: done in {time.perf_counter() - start:.1f} s, kept in {path}")
        dataset.reference_logps = values
