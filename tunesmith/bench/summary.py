"""Print the result tables of saved ``tunesmith bench --json`` files: ``python -m tunesmith.bench.summary F...``."""

from __future__ import annotations

import json
import sys

from tunesmith.bench.spec import BenchOptions, Result

GOALS = {
    "lora": "goal: tunesmith >= 2.5x baseline tokens/s at <= baseline peak",
    "qlora": "goal: tunesmith peak <= 7.5 GiB and >= 2.5x baseline tokens/s",
    "full": "goal: tunesmith >= 2x baseline tokens/s at <= baseline peak",
}


def render(payload: dict) -> str:
    o = BenchOptions(**{k: v for k, v in payload["options"].items() if k in BenchOptions.__dataclass_fields__})
    fields = Result.__dataclass_fields__
    results = [Result(**{k: v for k, v in r.items() if k in fields}) for r in payload["results"]]
    head = (
        f"\n== {o.model_shape} {o.method} seq {o.seq_len} on {payload['device']}; "
        f"matmul {payload['matmul_tflops']:.0f} TFLOP/s; median of {o.steps} steps after {o.warmup} warm-up =="
    )
    lines = [head]
    if o.longest:
        for r in results:
            lines.append(f"{r.variant:<34} {r.error or r.note}")
        return "\n".join(lines)
    if o.method in GOALS:
        lines.append(GOALS[o.method])
    lines.append(f"{'variant':<26} {'tok/s':>8} {'GiB':>7} {'x base':>7} {'MFU':>6} {'spread':>7} {'loss':>6}  note")
    for r in results:
        if r.error or r.tokens_per_s <= 0:
            lines.append(
                f"{r.variant:<26} {'-':>8} {'-':>7} {'-':>7} {'-':>6} {'-':>7} {'-':>6}  {(r.error or r.note)[:90]}"
            )
        else:
            lines.append(
                f"{r.variant:<26} {r.tokens_per_s:>8,.0f} {r.peak_gib:>7.2f} "
                f"{(f'{r.ratio:.2f}' if r.ratio else '-'):>7} "
                f"{r.mfu * 100:>5.1f}% {100 * r.spread:>6.0f}% {r.loss:>6.2f}  {r.note}"
            )
    return "\n".join(lines)


def main(paths: list[str]) -> int:
    for path in paths:
        try:
            with open(path) as f:
                print(render(json.load(f)))
        except FileNotFoundError:
            print(f"\n== {path}: no results (stage did not run or did not finish)")
        except Exception as exc:  # noqa: BLE001
            print(f"\n== {path}: unreadable ({type(exc).__name__}: {exc})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
