"""Throughput and memory of one training step: a plain transformers + peft loop against tunesmith's, in one
process on one device, with each fast path switched off in turn.

Variants (names as printed):

* ``baseline``: what a user writes (issue 6): transformers model in bf16 with SDPA, gradient checkpointing
  (``use_reentrant=False``), ``model.train()``, peft LoRA r 64 / alpha 16 / dropout 0.1 on q,k,v,o,gate,up,down,
  torch AdamW, ``model(input_ids, labels=...)`` on one ``1 x L`` row. QLoRA: NF4 + double quant + bf16 compute,
  then ``prepare_model_for_kbit_training``. Full: every weight trained, no peft.
* ``tunesmith``: the same shape and hyper-parameters from ``TrainConfig(method=...)``: LoRA from ``cfg.lora``,
  k-bit preparation that keeps embeddings / norms / head in bf16, ``apply_fast_paths(model, cfg)`` with the
  default fast paths, the loss through ``model_loss_sum`` (chunked / fused CE), fused AdamW, on oasst1-shaped
  packed rows (:mod:`tunesmith.bench.data`), and as many layers left un-checkpointed as fit in the memory budget
  (the baseline's peak for LoRA / full, 8 GiB for QLoRA), from two measured peaks (``ckpt auto``).
* ``tunesmith[ckpt full]``: every layer checkpointed (the least memory); ``tunesmith[no ckpt]``: none (the
  speed ceiling, whatever the memory).
* ``tunesmith[same data]``: ``tunesmith`` on the baseline's own row (one sample, loss on every token): the
  speed-up that does not come from packing.
* ``tunesmith[budget F]``: no layer checkpointed; instead the compiler's partitioner keeps only a fraction ``F`` of
  the activations it would keep and recomputes the cheapest of the rest (selective checkpointing).
* ``tunesmith+adamw8bit`` (QLoRA): bitsandbytes' 8-bit AdamW, for the memory it saves.
* ``-compile``, ``-packed_attention``, ``-liger``, ``-chunked_loss``, ``-fused_lora``: ``tunesmith`` with one
  switch off (``-compile``: eager layers, with liger's norm and SwiGLU modules).
* ``baseline[again]``: the baseline once more, timed last: the drift of the machine over the run.

Method (timings on a GPU are only worth something warm): before anything is timed, one untimed pass builds the
first tunesmith variant and runs every distinct batch the variants will see once (Triton JIT of the liger
kernels, cuBLAS / flash heuristics, allocator growth, the first fused optimizer step). Each variant then runs
``warmup`` untimed steps and ``steps`` timed ones (each synchronised) and reports the median step; the spread
column is (slowest - fastest) / median of the timed steps. ``--profile`` adds one profiled step of the baseline
and of ``tunesmith``: the top kernels, the top host-side ops, and how busy the GPU was during a step (a step the
GPU is idle in is host-bound: Python, dispatch and kernel-launch overhead, not arithmetic).

The model is built from a config with random weights directly on the device (bf16), so nothing is downloaded.
Until ``tunesmith.models.prepare_for_training`` lands, the tunesmith variant assembles the same steps here
(:func:`_prepare_tunesmith`); the fast paths themselves are the library's.
"""

from __future__ import annotations

import gc
import json
import math
import os
import signal
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from tunesmith.bench.data import packed_batches, plain_batch
from tunesmith.bench.flops import effective_context, flops_per_token, mfu
from tunesmith.bench.shapes import SHAPES, Shape
from tunesmith.models.fast.checkpointing import set_activation_budget

GiB = 1024**3
PROFILED = ("baseline", "tunesmith")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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
    """One variant: which loop, and the switches of the tunesmith loop."""

    name: str
    kind: str = "tunesmith"  # baseline | tunesmith
    packed_attention: bool = True
    liger_kernel: str = "auto"
    chunked_loss: bool = True
    fused_lora: bool = True
    compile: bool | None = None  # None: speed.compile auto (compiled layers on CUDA)
    optimizer: str = "adamw"  # adamw | adamw8bit
    ckpt: str = "auto"  # auto | full | none | N (layers left un-checkpointed)
    data: str = "packed"  # packed | plain
    extra: dict = field(default_factory=dict)


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------- device


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def measure_matmul_flops(device: torch.device) -> float:
    """The card's dense matmul rate on random data (bf16 on CUDA, fp32 on CPU), FLOP/s."""
    if device.type == "cuda":
        n, dtype, reps = 8192, torch.bfloat16, 10
    else:
        n, dtype, reps = 512, torch.float32, 5
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    dt = (time.perf_counter() - t0) / reps
    del a, b
    return 2 * n**3 / dt


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GiB
    return float("nan")


# ---------------------------------------------------------------------------------------------- models


def build_base_model(shape: Shape, device: torch.device, seq_len: int) -> nn.Module:
    """Random-initialised Llama-architecture model of ``shape``, created directly on ``device``."""
    from transformers import LlamaForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = shape.llama_config(seq_len)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model


def quantize_nf4(model: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    """Replace every decoder linear with a bitsandbytes NF4 ``Linear4bit`` (double quant, ``compute_dtype``),
    as ``from_pretrained(quantization_config=BitsAndBytesConfig(...))`` would; the head stays unquantized."""
    import bitsandbytes as bnb

    decoder = model.get_decoder()
    for parent in list(decoder.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            q = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=compute_dtype,
                compress_statistics=True,
                quant_type="nf4",
                device="meta",
            )
            weight = child.weight.data
            q.weight = bnb.nn.Params4bit(
                weight, requires_grad=False, compress_statistics=True, quant_type="nf4", module=q
            )
            q.weight = q.weight.to(weight.device)  # quantizes
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, q)
            del child, weight
    model.is_loaded_in_4bit = True  # what transformers sets; peft dispatches its bnb LoRA layers on it
    model.quantization_method = "bitsandbytes"
    return model


def _enable_checkpointing(model: nn.Module) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _peft(model: nn.Module, r: int, alpha: int, dropout: float, targets) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        model,
        LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM"),
    )


def _prepare_baseline(model: nn.Module, method: str) -> nn.Module:
    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    _enable_checkpointing(model)
    if method in ("lora", "qlora"):
        model = _peft(model, 64, 16, 0.1, LORA_TARGETS)
    model.train()
    return model


class _Speed:
    """``cfg.speed`` plus the proposed ``fused_lora`` key (not in the schema yet)."""

    def __init__(self, speed: Any, **extra: Any):
        self._speed = speed
        self.__dict__.update(extra)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._speed, name)


def tunesmith_config(method: str, spec: Spec):
    from tunesmith.config.schema import TrainConfig

    cfg = TrainConfig(
        method=method,
        speed={
            "packed_attention": spec.packed_attention,
            "liger_kernel": spec.liger_kernel,
            "chunked_loss": spec.chunked_loss,
            "compile": "auto" if spec.compile is None else spec.compile,
        },
    )
    return cfg, _Speed(cfg.speed, fused_lora=spec.fused_lora)


def _prepare_tunesmith(model: nn.Module, method: str, spec: Spec) -> tuple[nn.Module, Any]:
    """tunesmith's own preparation (``tunesmith.models.prepare_for_training``: frozen base kept in bf16, LoRA
    from ``cfg.lora`` on every linear but the head, non-re-entrant checkpointing, train mode), then
    ``apply_fast_paths``."""
    from tunesmith.models.fast import apply_fast_paths

    cfg, speed = tunesmith_config(method, spec)
    cfg.training.gradient_checkpointing = spec.ckpt != "none"
    try:
        from tunesmith.models import prepare_for_training
    except ImportError:  # the models stage is not there: the same steps, spelled out
        prepare_for_training = None
    if prepare_for_training is not None:
        model = prepare_for_training(model, cfg)
    else:
        for p in model.parameters():
            p.requires_grad_(method == "full")
        if spec.ckpt != "none":
            _enable_checkpointing(model)
        if method in ("lora", "qlora"):
            model = _peft(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, LORA_TARGETS)
        model.train()
    apply_fast_paths(model, speed)
    return model, speed


def make_optimizer(model: nn.Module, kind: str, fused: bool) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=2e-4, weight_decay=0.0)
    kwargs = {"fused": True} if fused and params and params[0].is_cuda else {}
    return torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, **kwargs)


# ---------------------------------------------------------------------------------------------- steps


def baseline_step(model: nn.Module, opt, batch: dict) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], labels=batch["labels"])
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.detach()


def make_tunesmith_step(speed: Any, device: torch.device) -> Callable:
    """The train loop's micro-step: bf16 autocast on CUDA (as ``tunesmith train``), ``model_loss_sum`` with
    ``loss_options(cfg)``, token-mean loss, optimizer step."""
    import contextlib

    from tunesmith.models.fast import loss_options, model_loss_sum

    opts = loss_options(speed)

    def step(model: nn.Module, opt, batch: dict) -> torch.Tensor:
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
        with amp:
            loss_sum, n_tokens = model_loss_sum(model, batch, **opts)
        loss = loss_sum / n_tokens.clamp_min(1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def time_steps(step, model, opt, batches, warmup, steps, device) -> tuple[list[float], float]:
    times = []
    loss = torch.zeros(())
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        sync(device)
        t0 = time.perf_counter()
        loss = step(model, opt, batch)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times, float(loss.float())


# ---------------------------------------------------------------------------------------------- runner


class Bench:
    def __init__(self, options: BenchOptions):
        self.o = options
        self.shape = SHAPES[options.model_shape]
        self.device = pick_device(options.device)
        self.start = time.perf_counter()
        self.results: list[Result] = []
        self.peak_flops = 0.0
        # per optimizer (+compile): what ckpt auto chose, (layers left un-checkpointed, compiled activation budget)
        self.best_keep: dict[str, tuple[int, float | None]] = {}
        self.profiles: list[str] = []
        self._batches: dict[str, tuple[list[dict], float]] = {}
        self.durations: dict[str, float] = {}  # wall seconds of each variant that ran (build + steps)

    # -- helpers
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def budget_left(self) -> float:
        return self.o.time_budget_s - self.elapsed()

    def compiled(self, spec: Spec) -> bool:
        """Whether the variant's decoder layers are compiled (``apply_fast_paths``' own rule)."""
        from tunesmith.models.fast import compile_wanted

        speed = tunesmith_config(self.o.method, spec)[1]
        return spec.kind == "tunesmith" and compile_wanted(speed, device=self.device)

    def baseline_peak(self) -> float | None:
        for r in self.results:
            if r.variant == "baseline" and not r.error:
                return r.peak_gib
        return None

    def build(self, spec: Spec):
        method = self.o.method
        if self.compiled(spec):
            set_activation_budget(spec.extra.get("memory_budget"))
        model = build_base_model(self.shape, self.device, self.o.seq_len)
        if method == "qlora":
            quantize_nf4(model, torch.bfloat16 if self.device.type == "cuda" else torch.float32)
            free(self.device)
        if spec.kind == "baseline":
            model = _prepare_baseline(model, method)
            return model, make_optimizer(model, "adamw", fused=False), baseline_step
        model, speed = _prepare_tunesmith(model, method, spec)
        return model, make_optimizer(model, spec.optimizer, fused=True), make_tunesmith_step(speed, self.device)

    def batches(self, spec: Spec) -> tuple[list[dict], float]:
        """The rows a variant trains on: the same ones for every variant of a kind (made once, seed 0)."""
        kind = "plain" if spec.kind == "baseline" or spec.data == "plain" else "packed"
        if kind not in self._batches:
            n = self.o.warmup + self.o.steps
            if kind == "plain":
                rows = [plain_batch(self.o.seq_len, self.shape.vocab, self.device, seed=i) for i in range(n)]
                self._batches[kind] = rows, float(self.o.seq_len)
            else:
                rows = packed_batches(self.o.seq_len, self.shape.vocab, n, self.device, seed=0)
                ctx = statistics.mean(effective_context(r["sample_lengths"]) for r in rows)
                self._batches[kind] = rows, ctx
        return self._batches[kind]

    def ckpt_budget_gib(self) -> float | None:
        if self.o.method == "qlora":
            return self.o.qlora_budget_gib
        return self.baseline_peak()

    def time_needed(self, spec: Spec) -> float:
        """Seconds a variant is expected to take (the median of those of its kind that ran; 25 s before)."""
        same = [t for name, t in self.durations.items() if name.startswith("baseline") == (spec.kind == "baseline")]
        if same:
            return statistics.median(same)
        return 60.0 if self.compiled(spec) else 25.0

    def reserve(self, specs_left: list[Spec]) -> float:
        """Time kept back for ``baseline[again]`` (it runs last whatever else is skipped)."""
        if "baseline" in self.durations and any(s.name == "baseline[again]" for s in specs_left):
            return self.durations["baseline"] + 5.0
        return 0.0

    # -- warm-up pass
    def warm_up(self, specs: list[Spec]) -> None:
        """One untimed pass before any variant is timed: the first tunesmith variant runs every distinct batch
        the tunesmith variants will see once, so one-off costs (Triton JIT of the liger kernels, kernel
        heuristics for each new shape, allocator growth, the first fused optimizer step) land here."""
        tun = [s for s in specs if s.kind == "tunesmith"]
        if not tun or self.budget_left() < 30:
            return
        spec = tun[0]
        t0 = time.perf_counter()
        model = opt = step = None
        n = 0
        try:
            free(self.device)
            model, opt, step = self.build(spec)
            for kind in dict.fromkeys("plain" if s.data == "plain" else "packed" for s in tun):
                rows, _ = self.batches(Spec("warm-up", data=kind))
                for batch in rows if kind == "packed" else rows[:1]:  # plain rows all have one shape
                    step(model, opt, batch)
                    n += 1
            sync(self.device)
            log(f"[bench] warm-up pass ({spec.name}, untimed): {n} steps in {time.perf_counter() - t0:.1f}s")
        except Exception as exc:  # noqa: BLE001 - the variants still run (and report) without it
            log(f"[bench] warm-up pass failed: {type(exc).__name__}: {exc}")
        finally:
            del model, opt, step
            free(self.device)

    def run_variant(self, spec: Spec, specs_left: list[Spec]) -> None:
        from tunesmith.models.fast import set_checkpointed_layers

        need = self.time_needed(spec)
        reserve = 0.0 if spec.name == "baseline[again]" else self.reserve(specs_left)
        if self.budget_left() - reserve < need:
            self.results.append(Result(spec.name, note="skipped: time budget"))
            log(f"[bench] {spec.name}: skipped (time budget)")
            return
        log(f"[bench] {spec.name}: building ({self.elapsed():.0f}s elapsed)")
        t_start = time.perf_counter()
        model = opt = step = None
        res = Result(spec.name)
        try:
            free(self.device)
            model, opt, step = self.build(spec)
            batches, ctx = self.batches(spec)
            notes = []
            if spec.kind == "tunesmith" and spec.ckpt != "none":
                keep, fraction = 0, None
                if spec.ckpt == "auto":
                    keep, fraction = self.plan_checkpointing(model, opt, step, batches, spec)
                elif spec.ckpt.isdigit():
                    keep = int(spec.ckpt)
                checkpointed = set_checkpointed_layers(model, keep)
                notes.append(f"ckpt {checkpointed}/{self.shape.layers}")
                if fraction is not None:  # compiled again below, with the chosen fraction
                    set_activation_budget(fraction)
                    torch._dynamo.reset()
                    notes.append(f"act budget {fraction:.2f}")
            if spec.kind == "tunesmith" and spec.data == "packed":
                notes.append(f"ctx {ctx:.0f}")
            if self.compiled(spec):  # compile (and recompile) for every kind of batch before anything is timed
                for batch in batches[: self.o.warmup + self.o.steps]:
                    step(model, opt, batch)
            reset_peak(self.device)
            times, loss = time_steps(step, model, opt, batches, self.o.warmup, self.o.steps, self.device)
            med = statistics.median(times)
            res.step_ms = med * 1000
            res.tokens_per_s = self.o.seq_len / med
            res.spread = (max(times) - min(times)) / med if med > 0 else 0.0
            res.peak_gib = peak_gib(self.device)
            res.loss = loss
            res.mfu = mfu(res.tokens_per_s, flops_per_token(self.shape, self.o.method, ctx), self.peak_flops)
            if spec.name == "baseline[again]":
                first = next((r for r in self.results if r.variant == "baseline" and r.tokens_per_s > 0), None)
                if first:
                    notes.append(f"drift {100 * (res.tokens_per_s / first.tokens_per_s - 1):+.1f}% vs first")
            self.durations[spec.name] = time.perf_counter() - t_start
            if self.o.profile and spec.name in PROFILED:
                try:
                    res.gpu_busy = self.profile(spec.name, step, model, opt, batches[0], res.step_ms)
                    if res.gpu_busy:
                        notes.append(f"GPU busy {100 * res.gpu_busy:.0f}%")
                except Exception as exc:  # noqa: BLE001 - a profiler problem must not lose the timing
                    log(f"[bench] profile of {spec.name} failed: {type(exc).__name__}: {exc}")
            res.note = ", ".join(notes)
            log(
                f"[bench] {spec.name}: {res.tokens_per_s:,.0f} tok/s, peak {res.peak_gib:.2f} GiB, "
                f"step {res.step_ms:.0f} ms (steps {', '.join(f'{t * 1000:.0f}' for t in times)}), "
                f"loss {loss:.3f} {res.note}"
            )
        except Exception as exc:  # noqa: BLE001 - one variant failing must not stop the table
            res.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            log(f"[bench] {spec.name}: FAILED {res.error}")
            traceback.print_exc(limit=6, file=sys.stdout)
        finally:
            del model, opt, step
            if self.compiled(spec):
                try:
                    torch._dynamo.reset()
                except Exception:
                    pass
                set_activation_budget(None)
            free(self.device)
        self.results.append(res)

    def plan_checkpointing(self, model, opt, step, batches, spec: Spec) -> tuple[int, float | None]:
        """How to fit the memory budget: ``(layers left un-checkpointed, activation budget of compiled layers)``.

        Compiled layers first try the compiler's own selective recomputation (``fit_compiled_activations``: one
        measured step per probed fraction, no layer checkpointed); when even the smallest fraction does not fit,
        or the layers are eager, whole layers are checkpointed (``auto_keep_activations``: two measured steps)."""
        from tunesmith.models.fast.checkpointing import (
            auto_keep_activations,
            decoder_layers,
            fit_compiled_activations,
        )

        key = spec.optimizer + ("+compile" if self.compiled(spec) else "")  # compiled layers keep other activations
        if key in self.best_keep:
            return self.best_keep[key]
        budget = self.ckpt_budget_gib()
        n = len(decoder_layers(model))
        if budget is None or self.device.type != "cuda":
            self.best_keep[key] = (0, None)
            return self.best_keep[key]
        step(model, opt, batches[0])  # warm-up: optimizer states exist before the peaks are read
        if self.compiled(spec):
            fraction, probes = fit_compiled_activations(model, lambda: step(model, opt, batches[0]), budget * GiB)
            log(
                f"[bench] ckpt auto: budget {budget:.2f} GiB, compiled layers' peaks "
                + ", ".join(f"{p / GiB:.2f} GiB at {f}" for f, p in probes)
                + (f" -> activation budget {fraction:.3f}, no layer checkpointed" if fraction is not None else "")
            )
            if fraction is not None:
                self.best_keep[key] = (n, fraction)
                return self.best_keep[key]
        peaks = []

        def run_step():
            step(model, opt, batches[0])
            peaks.append(torch.cuda.max_memory_allocated(self.device) / GiB)

        keep = auto_keep_activations(model, run_step, budget * GiB)
        log(
            f"[bench] ckpt auto: budget {budget:.2f} GiB, peaks {', '.join(f'{p:.2f}' for p in peaks)} GiB "
            f"(all checkpointed, {max(1, n // 8)} kept) -> keep {keep}/{n} layers"
        )
        self.best_keep[key] = (keep, None)
        return self.best_keep[key]

    def profile(self, name: str, step, model, opt, batch, step_ms: float) -> float:
        """One profiled step: top kernels by device time, top host-side ops, and the fraction of the (median,
        un-profiled) step the device was busy. Returns that fraction (0 on CPU)."""
        from torch.profiler import ProfilerActivity, profile

        on_cuda = self.device.type == "cuda"
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
        with profile(activities=acts) as prof:
            step(model, opt, batch)
            sync(self.device)
        events = prof.key_averages()
        device_key = "self_device_time_total"
        if on_cuda and len(events) and not hasattr(events[0], device_key):
            device_key = "self_cuda_time_total"  # older torch
        busy = 0.0
        head = f"--- profile: {name} (one step) ---"
        parts = []
        if on_cuda:
            from torch.autograd import DeviceType

            # kernel time, as the profiler's own "Self CUDA time total" counts it (device events only)
            device_us = sum(
                getattr(e, device_key, 0) or 0
                for e in events
                if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
            )
            busy = device_us / 1000 / step_ms if step_ms > 0 else 0.0
            head += (
                f"\nkernels {device_us / 1000:.0f} ms in a {step_ms:.0f} ms step: GPU busy {100 * busy:.0f}%"
                + (" (host-bound: launch / Python overhead)" if busy < 0.8 else "")
            )
            parts.append("top kernels by device time:")
            parts.append(_table(events, device_key, 12))
        parts.append("top ops by host time:")
        parts.append(_table(events, "self_cpu_time_total", 10))
        text = "\n".join([head, *parts])
        self.profiles.append(text)
        print(text, flush=True)
        return busy

    # -- the variant lists
    def default_specs(self) -> list[Spec]:
        m = self.o.method
        specs = [Spec("baseline", kind="baseline"), Spec("tunesmith")]
        if m == "qlora":
            specs.append(Spec("tunesmith+adamw8bit", optimizer="adamw8bit"))
        specs.append(Spec("-compile", compile=False))
        if m != "qlora":
            specs.append(Spec("tunesmith[no ckpt]", ckpt="none"))
            for fraction in (0.5, 0.25):  # selective recomputation chosen by the compiler instead of whole layers
                specs.append(Spec(f"tunesmith[budget {fraction}]", ckpt="none", extra={"memory_budget": fraction}))
        specs += [
            Spec("-packed_attention", packed_attention=False),
            Spec("-fused_lora", fused_lora=False),
            Spec("-liger", liger_kernel="off"),
            Spec("-chunked_loss", chunked_loss=False),
        ]
        specs.append(Spec("tunesmith[same data]", data="plain"))
        if m != "qlora":
            specs.append(Spec("tunesmith[ckpt full]", ckpt="full"))
        if m == "full":
            specs = [s for s in specs if s.name != "-fused_lora"]
        specs.append(Spec("baseline[again]", kind="baseline"))  # drift check: the same loop, timed last
        if self.o.variants:
            wanted = set(self.o.variants)
            specs = [s for s in specs if s.name in wanted]
        return specs

    # -- main entry
    def run(self) -> list[Result]:
        o = self.o
        log(
            f"[bench] shape {o.model_shape}, method {o.method}, seq {o.seq_len}, steps {o.steps} "
            f"(+{o.warmup} warm-up, median reported), device {describe_device(self.device)}"
        )

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
                    self.run_variant(spec, specs[i + 1 :])
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
            payload = {
                "options": asdict(self.o),
                "device": describe_device(self.device),
                "matmul_tflops": self.peak_flops / 1e12,
                "results": [asdict(r) for r in self.results],
                "profiles": self.profiles,
            }
            tmp = self.o.json_out + ".tmp"
            with open(tmp, "w") as f:
                json.dump(payload, f, indent=1, default=str)
            os.replace(tmp, self.o.json_out)

    # -- longest trainable sequence
    def run_longest(self) -> None:
        """Longest single-sample sequence one training step fits in ``longest_card_gib`` (a smaller card emulated
        with the allocator's per-process memory fraction), for the baseline and for tunesmith."""
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            frac = min(1.0, self.o.longest_card_gib * GiB / total)
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            torch.cuda.set_per_process_memory_fraction(frac, index)
            log(f"[bench] longest: emulating a {self.o.longest_card_gib:.0f} GiB card (fraction {frac:.3f})")
        # eager layers here: compiled ones would be compiled again for each new length the search tries
        specs = [Spec("baseline", kind="baseline"), Spec("tunesmith", data="plain", compile=False)]
        share = self.budget_left() / len(specs)
        for i, spec in enumerate(specs):
            deadline = time.perf_counter() + (self.budget_left() / (len(specs) - i) if i else share)
            res = Result(spec.name)
            model = opt = step = None
            try:
                model, opt, step = self.build(spec)
                best, first_fail = self._search(step, model, opt, deadline)
                if best == 0 and not first_fail:
                    res.note = "not measured: the time budget ran out before the first length"
                elif best == 0:
                    res.note = f"not even {first_fail:,} tokens fit"
                else:
                    res.note = f"longest {best:,} tokens" + (
                        f" (fails at {first_fail:,})"
                        if first_fail
                        else f" (search stopped at {self.o.longest_max:,})"
                    )
                res.tokens_per_s = 0.0
                res.peak_gib = float(best)
                log(f"[bench] longest {spec.name}: {res.note}")
            except Exception as exc:  # noqa: BLE001
                res.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                log(f"[bench] longest {spec.name}: FAILED {res.error}")
            finally:
                del model, opt, step
                free(self.device)
            self.results.append(res)

    def _search(self, step, model, opt, deadline: float) -> tuple[int, int | None]:
        def fits(length: int) -> bool:
            batch = plain_batch(length, self.shape.vocab, self.device)
            try:
                step(model, opt, batch)
                sync(self.device)
                log(f"[bench]   {length:,}: ok")
                return True
            except torch.OutOfMemoryError:
                log(f"[bench]   {length:,}: out of memory")
                return False
            finally:
                opt.zero_grad(set_to_none=True)
                del batch
                free(self.device)

        lo, hi = 0, None
        length = min(max(1024, self.o.seq_len), self.o.longest_max)
        while length <= self.o.longest_max and time.perf_counter() < deadline:
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


def _table(events, sort_by: str, rows: int) -> str:
    try:
        return events.table(sort_by=sort_by, row_limit=rows, max_name_column_width=60)
    except Exception:  # noqa: BLE001 - column names differ across torch versions
        return events.table(sort_by="self_cpu_time_total", row_limit=rows)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / GiB:.0f} GiB), torch {torch.__version__}"
    return f"cpu ({os.cpu_count()} cores), torch {torch.__version__}"


def format_table(results: list[Result], o: BenchOptions, device: torch.device, peak_flops: float) -> str:
    head = (
        f"\n== tunesmith bench: {o.model_shape} {o.method} seq {o.seq_len} on {describe_device(device)}; "
        f"matmul {peak_flops / 1e12:.2f} TFLOP/s; median of {o.steps} steps after {o.warmup} warm-up =="
    )
    if o.longest:
        lines = [head, f"{'variant':<32} {'longest sequence':>40}"]
        for r in results:
            lines.append(f"{r.variant:<32} {r.error or r.note:>40}")
        return "\n".join(lines)
    cols = (
        f"{'variant':<26} {'tokens/s':>9} {'peak GiB':>9} {'x base':>7} {'MFU':>6} {'step ms':>8} {'spread':>7} "
        f"{'loss':>7}  note"
    )
    lines = [head, cols, "-" * len(cols)]
    for r in results:
        if r.error or r.tokens_per_s <= 0:
            lines.append(
                f"{r.variant:<26} {'-':>9} {'-':>9} {'-':>7} {'-':>6} {'-':>8} {'-':>7} {'-':>7}  {r.error or r.note}"
            )
            continue
        peak = f"{r.peak_gib:.2f}" if not math.isnan(r.peak_gib) else "n/a"
        ratio = f"{r.ratio:.2f}" if r.ratio else "-"
        lines.append(
            f"{r.variant:<26} {r.tokens_per_s:>9,.0f} {peak:>9} {ratio:>7} {r.mfu * 100:>5.1f}% "
            f"{r.step_ms:>8.0f} {100 * r.spread:>6.0f}% {r.loss:>7.3f}  {r.note}"
        )
    return "\n".join(lines)


def run_bench(options: BenchOptions) -> list[Result]:
    if options.model_shape not in SHAPES:
        from tunesmith.errors import unknown_name_error

        raise unknown_name_error("model shape", options.model_shape, SHAPES)
    if options.method not in ("lora", "qlora", "full"):
        from tunesmith.errors import unknown_name_error

        raise unknown_name_error("method", options.method, ["lora", "qlora", "full"])
    return Bench(options).run()
