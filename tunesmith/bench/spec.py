"""What a step bench is asked (``BenchOptions``), what each variant is (``Spec``) and what it measured (``Result``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BenchOptions:
    model_shape: str = "tiny"
    method: str = "lora"
    seq_len: int = 2048
    steps: int = 8
    warmup: int = 3
    variants: list[str] | None = None  # None: the default set for the method
    profile: bool = False
    longest: bool = False
    longest_card_gib: float = 80.0
    longest_max: int = 65536
    time_budget_s: float = 480.0
    device: str = "auto"
    json_out: str | None = None
    qlora_budget_gib: float = 8.0
    overrides: list[str] = field(default_factory=list)  # --set for every tunesmith variant


@dataclass
class Result:
    variant: str
    tokens_per_s: float = 0.0
    peak_gib: float = 0.0
    step_ms: float = 0.0
    mfu: float = 0.0
    ratio: float = 0.0
    loss: float = float("nan")
    note: str = ""
    error: str = ""
    spread: float = 0.0  # (slowest - fastest) / median of the timed steps
    gpu_busy: float = 0.0  # device time / step time of the profiled step (0: not profiled)


@dataclass
class Spec:
    """One variant: which loop, the config overrides of a tunesmith one, and its rows."""

    name: str
    kind: str = "tunesmith"  # baseline | tunesmith
    overrides: tuple[str, ...] = ()
    data: str = "packed"  # packed | plain
    fit: bool = True  # tunesmith: plan activations into the baseline's peak (or the QLoRA budget)


def log(msg: str) -> None:
    print(msg, flush=True)
