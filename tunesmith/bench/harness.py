"""Throughput and memory of one training step: the plain transformers + peft loop (baseline.py) against the
product's own step, in one process on one device.

Every tunesmith variant is the training step `tunesmith train` runs, built the way it builds it: a
``TrainConfig`` (the method's defaults plus the variant's overrides and ``--set``), ``setup.prepare_model`` (LoRA /
k-bit preparation, the fast paths decided for the device), ``build_optimizer``, the activation planner of
``train.memory`` and a :class:`~tunesmith.train.step.TrainStep` over a one-micro-batch window. Only the weights
are random and built in memory, and the rows are oasst1-shaped packed rows (bench/data.py). Variants:

* ``baseline``: the plain loop; ``baseline[again]``: the same, timed last (the machine's drift over the run).
* ``tunesmith``: default fast paths, with ``speed.memory_fraction`` set so the activation plan fits the
  baseline's peak (LoRA, full) or ``--qlora-budget-gib`` (QLoRA); ``tunesmith[card]``: the default fraction
  (the plan may fill the card); ``tunesmith+adamw8bit``: bitsandbytes' 8-bit AdamW.
* ``-compile``, ``-packed_attention``, ``-liger``, ``-chunked_loss``, ``-fused_lora``: ``tunesmith`` with that
  ``speed`` key off; ``tunesmith[no ckpt]``: gradient checkpointing off (the speed ceiling, whatever the memory);
  ``tunesmith[same data]``: ``tunesmith`` on the baseline's own row (one sample, loss on every token).

Method: before anything is timed, one untimed pass runs the first tunesmith variant over every distinct batch
(kernel JIT, allocator growth, the first fused optimizer step). Each variant then runs ``warmup`` untimed steps
(compiled variants first run every batch once) and ``steps`` timed ones, each synchronised; the table reports
the median step and the spread ((slowest - fastest) / median). ``--profile`` adds one profiled step of the
baseline and of ``tunesmith``: top kernels, top host ops, and how busy the GPU was.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from tunesmith.bench.baseline import baseline_optimizer, baseline_step, build_base_model, prepare_baseline, quantize_nf4
from tunesmith.bench.data import packed_batches, plain_batch
from tunesmith.bench.flops import effective_context, flops_per_token, mfu
from tunesmith.bench.hardware import (
    card_gib,
    describe_device,
    free,
    measure_matmul_flops,
    peak_gib,
    pick_device,
    reset_peak,
    sync,
)
from tunesmith.bench.longest import run_longest, search_longest
from tunesmith.bench.report import format_table, profile_step
from tunesmith.bench.shapes import SHAPES
from tunesmith.bench.spec import BenchOptions, Result, Spec, log

PROFILED = ("baseline", "tunesmith")


def time_steps(run: Callable[[dict], float], batches: list[dict], warmup: int, steps: int,
               device: torch.device) -> tuple[list[float], float]:
    times, loss = [], float("nan")
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        loss = run(batches[i % len(batches)])
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times, loss


@dataclass
class Built:
    run: Callable[[dict], float]  # one step on one batch; returns its loss
    note: str = ""
    compiled: bool = False
    keep: list[Any] = field(default_factory=list)  # what must stay alive while the variant runs


class Bench:
    def __init__(self, options: BenchOptions):
        self.o = options
        self.shape = SHAPES[options.model_shape]
        self.device = pick_device(options.device)
        self.start = time.perf_counter()
        self.results: list[Result] = []
        self.peak_flops = 0.0
        self.profiles: list[str] = []
        self._batches: dict[str, tuple[list[dict], float]] = {}
        self.durations: dict[str, float] = {}  # wall seconds of each variant that ran (build + steps)

    # -- helpers
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def budget_left(self) -> float:
        return self.o.time_budget_s - self.elapsed()

    def baseline_peak(self) -> float | None:
        return next((r.peak_gib for r in self.results if r.variant == "baseline" and not r.error), None)

    def fit_gib(self) -> float | None:
        """The memory the ``tunesmith`` variant's activation plan fits into."""
        return self.o.qlora_budget_gib if self.o.method == "qlora" else self.baseline_peak()

    def config(self, spec: Spec):
        """The variant's TrainConfig: the method's defaults, ``--set``, the variant's own overrides."""
        from tunesmith.config.load import validate
        from tunesmith.config.overrides import apply_overrides

        overrides = [*self.o.overrides, *spec.overrides]
        fit = self.fit_gib() if spec.fit and self.device.type == "cuda" else None
        if fit is not None:
            overrides.append(f"speed.memory_fraction={min(1.0, fit / card_gib(self.device)):.6f}")
        return validate(apply_overrides({"method": self.o.method}, overrides), "bench variant " + spec.name)

    # -- building a variant
    def build(self, spec: Spec) -> Built:
        if spec.kind == "baseline":
            model = build_base_model(self.shape, self.device, self.o.seq_len)
            if self.o.method == "qlora":
                quantize_nf4(model, torch.bfloat16 if self.device.type == "cuda" else torch.float32)
                free(self.device)
            model = prepare_baseline(model, self.o.method)
            opt = baseline_optimizer(model)
            return Built(lambda batch: float(baseline_step(model, opt, batch).float()), keep=[model, opt])
        return self.build_tunesmith(spec)

    def build_tunesmith(self, spec: Spec) -> Built:
        from tunesmith.models import pick_dtype
        from tunesmith.train.loss import CausalLMLoss
        from tunesmith.train.memory import fit_activations, planning_wanted
        from tunesmith.train.optim import build_optimizer, trainable_parameters
        from tunesmith.train.setup import prepare_model, resolve_precision, weights_dtype
        from tunesmith.train.step import LocalBackend, TrainStep

        cfg = self.config(spec)
        precision = resolve_precision(cfg.training.mixed_precision, self.device)
        model = build_base_model(self.shape, self.device, self.o.seq_len,
                                 dtype=pick_dtype(weights_dtype(cfg, precision, 0)))
        if cfg.quantization.bits == 4:
            quantize_nf4(model, torch.bfloat16 if self.device.type == "cuda" else torch.float32)
            free(self.device)
        model, fast = prepare_model(model, cfg, device=self.device)
        params = trainable_parameters(model)
        optimizer = build_optimizer(params, cfg.training, fused=self.device.type == "cuda")
        module = CausalLMLoss(model, fast.loss_options())
        notes = ["compiled" if fast.compiled else "eager"]
        if planning_wanted(fast, cfg.training.gradient_checkpointing):
            plan = fit_activations(model, module, params, cfg, self.batches(spec)[0][0], precision=precision,
                                   device=self.device)
            log(f"[bench] {spec.name}: {plan.describe()}")
            notes.append(f"act {100 * plan.fraction:.0f}%, {plan.whole_layers}/{plan.layers} whole")
        backend = LocalBackend(module, optimizer, params, precision=precision, device=self.device,
                               max_norm=cfg.training.max_norm)
        step = TrainStep(backend, self.device, fast.host_inputs)
        return Built(lambda batch: step([batch]).loss, note=", ".join(notes), compiled=fast.compiled,
                     keep=[model, optimizer, step])

    def batches(self, spec: Spec) -> tuple[list[dict], float]:
        """The rows a variant trains on: the same ones for every variant of a kind (made once, seed 0)."""
        kind = "plain" if spec.kind == "baseline" or spec.data == "plain" else "packed"
        if kind not in self._batches:
            n = self.o.warmup + self.o.steps
            if kind == "plain":
                rows = [plain_batch(self.o.seq_len, self.shape.vocab, self.device, seed=i) for i in range(n)]
                for row in rows:
                    row["num_loss_tokens"] = self.o.seq_len - 1
                self._batches[kind] = rows, float(self.o.seq_len)
            else:
                rows = packed_batches(self.o.seq_len, self.shape.vocab, n, self.device, seed=0)
                ctx = statistics.mean(effective_context(r["sample_lengths"]) for r in rows)
                self._batches[kind] = rows, ctx
        return self._batches[kind]

    def time_needed(self, spec: Spec) -> float:
        """Seconds a variant is expected to take (the median of those of its kind that ran; a guess before)."""
        same = [t for name, t in self.durations.items() if name.startswith("baseline") == (spec.kind == "baseline")]
        if same:
            return statistics.median(same)
        return 25.0 if spec.kind == "baseline" or self.device.type != "cuda" else 60.0

    def reserve(self, specs_left: list[Spec]) -> float:
        """Time kept back for ``baseline[again]`` (it runs last whatever else is skipped)."""
        if "baseline" in self.durations and any(s.name == "baseline[again]" for s in specs_left):
            return self.durations["baseline"] + 5.0
        return 0.0

    # -- warm-up pass
    def warm_up(self, specs: list[Spec]) -> None:
        """One untimed pass before any variant is timed: the first tunesmith variant runs every distinct batch
        the tunesmith variants will see once, so one-off costs (kernel JIT, heuristics for each new shape,
        allocator growth, the first fused optimizer step) land here."""
        tun = [s for s in specs if s.kind == "tunesmith"]
        if not tun or self.budget_left() < 30:
            return
        spec = Spec(tun[0].name, overrides=tun[0].overrides, fit=False)
        t0 = time.perf_counter()
        built = None
        n = 0
        try:
            free(self.device)
            built = self.build(spec)
            for kind in dict.fromkeys("plain" if s.data == "plain" else "packed" for s in tun):
                rows, _ = self.batches(Spec("warm-up", data=kind))
                for batch in rows if kind == "packed" else rows[:1]:  # plain rows all have one shape
                    built.run(batch)
                    n += 1
            sync(self.device)
            log(f"[bench] warm-up pass ({spec.name}, untimed): {n} steps in {time.perf_counter() - t0:.1f}s")
        except Exception as exc:  # noqa: BLE001 - the variants still run (and report) without it
            log(f"[bench] warm-up pass failed: {type(exc).__name__}: {exc}")
        finally:
            del built
            self.reset_compiled()

    def reset_compiled(self) -> None:
        from tunesmith.models.fast.checkpointing import set_activation_budget

        torch._dynamo.reset()
        set_activation_budget(None)
        free(self.device)

    def run_variant(self, spec: Spec, specs_left: list[Spec]) -> None:
        need = self.time_needed(spec)
        reserve = 0.0 if spec.name == "baseline[again]" else self.reserve(specs_left)
        if self.budget_left() - reserve < need:
            self.results.append(Result(spec.name, note="skipped: time budget"))
            log(f"[bench] {spec.name}: skipped (time budget)")
            return
        log(f"[bench] {spec.name}: building ({self.elapsed():.0f}s elapsed)")
        t_start = time.perf_counter()
        built = None
        res = Result(spec.name)
        try:
            free(self.device)
            built = self.build(spec)
            batches, ctx = self.batches(spec)
            notes = [built.note] if built.note else []
            if spec.kind == "tunesmith" and spec.data == "packed":
                notes.append(f"ctx {ctx:.0f}")
            if built.compiled:  # compile (and recompile) for every kind of batch before anything is timed
                for batch in batches[: self.o.warmup + self.o.steps]:
                    built.run(batch)
            reset_peak(self.device)
            times, loss = time_steps(built.run, batches, self.o.warmup, self.o.steps, self.device)
            med = statistics.median(times)
            res.step_ms, res.tokens_per_s = med * 1000, self.o.seq_len / med
            res.spread = (max(times) - min(times)) / med if med > 0 else 0.0
            res.peak_gib, res.loss = peak_gib(self.device), loss
            res.mfu = mfu(res.tokens_per_s, flops_per_token(self.shape, self.o.method, ctx), self.peak_flops)
            if spec.name == "baseline[again]":
                first = next((r for r in self.results if r.variant == "baseline" and r.tokens_per_s > 0), None)
                if first:
                    notes.append(f"drift {100 * (res.tokens_per_s / first.tokens_per_s - 1):+.1f}% vs first")
            self.durations[spec.name] = time.perf_counter() - t_start
            if self.o.profile and spec.name in PROFILED:
                try:
                    res.gpu_busy = self.profile(spec.name, built.run, batches[0], res.step_ms)
                    if res.gpu_busy:
                        notes.append(f"GPU busy {100 * res.gpu_busy:.0f}%")
                except Exception as exc:  # noqa: BLE001 - a profiler problem must not lose the timing
                    log(f"[bench] profile of {spec.name} failed: {type(exc).__name__}: {exc}")
            res.note = ", ".join(notes)
            log(f"[bench] {spec.name}: {res.tokens_per_s:,.0f} tok/s, peak {res.peak_gib:.2f} GiB, "
                f"step {res.step_ms:.0f} ms (steps {', '.join(f'{t * 1000:.0f}' for t in times)}), "
                f"loss {loss:.3f} {res.note}")
        except Exception as exc:  # noqa: BLE001 - one variant failing must not stop the table
            res.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            log(f"[bench] {spec.name}: FAILED {res.error}")
            traceback.print_exc(limit=6, file=sys.stdout)
        finally:
            compiled = built is not None and built.compiled
            del built
            if compiled:
                self.reset_compiled()
            free(self.device)
        self.results.append(res)

    def profile(self, name: str, run, batch, step_ms: float) -> float:
        """One profiled step (``report.profile_step``); the text goes to the log and the JSON."""
        text, busy = profile_step(self.device, name, run, batch, step_ms)
        self.profiles.append(text)
        print(text, flush=True)
        return busy

    # -- the variant lists
    def default_specs(self) -> list[Spec]:
        m = self.o.method
        specs = [Spec("baseline", kind="baseline"), Spec("tunesmith"), Spec("tunesmith[card]", fit=False)]
        if m == "qlora":
            specs.append(Spec("tunesmith+adamw8bit", overrides=("training.optimizer=adamw_8bit",)))
        specs.append(Spec("-compile", overrides=("speed.compile=off",)))
        if m != "qlora":
            specs.append(Spec("tunesmith[no ckpt]", overrides=("training.gradient_checkpointing=false",), fit=False))
        specs += [Spec("-packed_attention", overrides=("speed.packed_attention=false",)),
                  Spec("-liger", overrides=("speed.liger_kernel=off",)),
                  Spec("-chunked_loss", overrides=("speed.chunked_loss=false",))]
        if m != "full":
            specs.append(Spec("-fused_lora", overrides=("speed.fused_lora=false",)))
        specs.append(Spec("tunesmith[same data]", data="plain"))
        specs.append(Spec("baseline[again]", kind="baseline"))  # drift check: the same loop, timed last
        if self.o.variants:
            wanted = set(self.o.variants)
            specs = [s for s in specs if s.name in wanted]
        return specs

    # -- main entry
    def run(self) -> list[Result]:
        o = self.o
        log(f"[bench] shape {o.model_shape}, method {o.method}, seq {o.seq_len}, steps {o.steps} "
            f"(+{o.warmup} warm-up, median reported), device {describe_device(self.device)}")

        def _terminate(signum, frame):  # `timeout` sends SIGTERM: still print the table of what ran
            raise SystemExit(128 + signum)

        try:
            signal.signal(signal.SIGTERM, _terminate)
        except ValueError:  # not the main thread
            pass
        try:
            self.peak_flops = measure_matmul_flops(self.device)
            log(f"[bench] measured matmul rate: {self.peak_flops / 1e12:.1f} TFLOP/s")
        except Exception as exc:  # noqa: BLE001
            log(f"[bench] matmul rate not measured: {exc}")
        try:
            if o.longest:
                self.run_longest()
            else:
                specs = self.default_specs()
                self.warm_up(specs)
                for i, spec in enumerate(specs):
                    self.run_variant(spec, specs[i + 1:])
        finally:
            self.finish()
        return self.results

    def finish(self) -> None:
        base = next((r for r in self.results if r.variant == "baseline" and r.tokens_per_s > 0), None)
        for r in self.results:
            if base and r.tokens_per_s > 0:
                r.ratio = r.tokens_per_s / base.tokens_per_s
        print(format_table(self.results, self.o, self.device, self.peak_flops), flush=True)
        if self.o.json_out:
            payload = {"options": asdict(self.o), "device": describe_device(self.device),
                       "matmul_tflops": self.peak_flops / 1e12, "results": [asdict(r) for r in self.results],
                       "profiles": self.profiles}
            tmp = self.o.json_out + ".tmp"
            with open(tmp, "w") as f:
                json.dump(payload, f, indent=1, default=str)
            os.replace(tmp, self.o.json_out)

    # -- longest trainable sequence
    def run_longest(self) -> None:
        run_longest(self)

    def _search(self, run, deadline: float) -> tuple[int, int | None]:
        return search_longest(self, run, deadline)


def run_bench(options: BenchOptions) -> list[Result]:
    from tunesmith.errors import unknown_name_error

    if options.model_shape not in SHAPES:
        raise unknown_name_error("model shape", options.model_shape, SHAPES)
    if options.method not in ("lora", "qlora", "full"):
        raise unknown_name_error("method", options.method, ["lora", "qlora", "full"])
    return Bench(options).run()
