"""The longest single-sample sequence one training step fits on a card (``tunesmith bench --longest``)."""

from __future__ import annotations

import time
from typing import Any

import torch

from tunesmith.bench.data import plain_batch
from tunesmith.bench.hardware import card_gib, free, sync
from tunesmith.bench.spec import Result, Spec, log


def run_longest(bench: Any) -> None:
    """Longest single-sample sequence one training step fits in ``longest_card_gib`` (a smaller card emulated
    with the allocator's per-process memory fraction), for the baseline and for tunesmith. ``bench`` is the
    step bench (harness.Bench): its options, device, variant builder and results."""
    if bench.device.type == "cuda":
        frac = min(1.0, bench.o.longest_card_gib / card_gib(bench.device))
        index = bench.device.index if bench.device.index is not None else torch.cuda.current_device()
        torch.cuda.set_per_process_memory_fraction(frac, index)
        log(f"[bench] longest: emulating a {bench.o.longest_card_gib:.0f} GiB card (fraction {frac:.3f})")
    # eager layers here: compiled ones would be compiled again for each new length the search tries
    specs = [Spec("baseline", kind="baseline"),
             Spec("tunesmith", data="plain", overrides=("speed.compile=off",), fit=False)]
    share = bench.budget_left() / len(specs)
    for i, spec in enumerate(specs):
        deadline = time.perf_counter() + (bench.budget_left() / (len(specs) - i) if i else share)
        res = Result(spec.name)
        built = None
        try:
            built = bench.build(spec)
            best, first_fail = bench._search(built.run, deadline)
            if best == 0 and not first_fail:
                res.note = "not measured: the time budget ran out before the first length"
            elif best == 0:
                res.note = f"not even {first_fail:,} tokens fit"
            else:
                res.note = f"longest {best:,} tokens" + (
                    f" (fails at {first_fail:,})" if first_fail else f" (search stopped at {bench.o.longest_max:,})")
            res.peak_gib = float(best)
            log(f"[bench] longest {spec.name}: {res.note}")
        except Exception as exc:  # noqa: BLE001
            res.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            log(f"[bench] longest {spec.name}: FAILED {res.error}")
        finally:
            del built
            free(bench.device)
        bench.results.append(res)

def search_longest(bench: Any, run, deadline: float) -> tuple[int, int | None]:
    def fits(length: int) -> bool:
        batch = plain_batch(length, bench.shape.vocab, bench.device)
        batch["num_loss_tokens"] = length - 1
        try:
            run(batch)
            sync(bench.device)
            log(f"[bench]   {length:,}: ok")
            return True
        except torch.OutOfMemoryError:
            log(f"[bench]   {length:,}: out of memory")
            return False
        finally:
            del batch
            free(bench.device)

    lo, hi = 0, None
    length = min(max(1024, bench.o.seq_len), bench.o.longest_max)
    while length <= bench.o.longest_max and time.perf_counter() < deadline:
        if fits(length):
            lo = length
            length *= 2
        else:
            hi = length
            break
    if hi is None:
        return lo, None
    while hi - lo > max(1024, lo // 16) and time.perf_counter() < deadline:
        mid = (lo + hi) // 2 // 1024 * 1024
        if mid <= lo:
            break
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi
