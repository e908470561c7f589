"""The training loop, written out: setup, restore, then for each step: step, log, evaluate, save.

1. Setup (setup.py): precision and seeds, the model prepared for the device it trains on with its fast paths
   (printed in one line), the tokenized and packed data, the module of training.objective (SFT's loss, or DPO /
   ORPO's, preference.py, with DPO's precomputed reference when it is one, reference.py), the optimizer and
   schedule; compiled layers get an activation plan that fits the card (memory.py); then the backend (one
   process, DDP or DeepSpeed; step.py).
2. Restore (state.py): weights, optimizer, schedule, grad scaler, RNG and data position of a `--resume`.
3. The loop: one :class:`~tunesmith.train.step.TrainStep` per accumulation window, then the schedule, the
   validation loss (validate.py; before the first step, every ``evaluation.validation_interval()`` steps and at
   the last), logs, evaluation prompts and checkpoints; with ``training.save_best`` a lower validation loss than
   any before (after step 0) is saved as ``best.pth``, which ``last_checkpoint`` never names.
4. Ctrl-C finishes the current step, saves, and reports the interruption (the CLI prints the resume command).

Everything the loop prints goes through one :class:`~tunesmith.train.runlog.RunLog`: the console and
``work_dir/train.log`` (rank 0 only).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunesmith.config import TrainConfig, config_hash, default_work_dir
from tunesmith.errors import TunesmithError
from tunesmith.files import make_parent, write_text_atomic
from tunesmith.models import resolve_model_path
from tunesmith.progress import format_duration, library_bars
from tunesmith.train import checkpoint as ckpt
from tunesmith.train.distributed import (
    DistEnv,
    barrier,
    deepspeed_config_path,
    resolve_deepspeed_config,
    setup_distributed,
    teardown_distributed,
    zero_stage,
)
from tunesmith.train.eval_hook import EvaluateChat
from tunesmith.train.failures import nan_error, oom_error
from tunesmith.train.memory import fit_activations, longest_batch, planning_wanted
from tunesmith.train.metrics import MetricsWriter
from tunesmith.train.optim import Schedule, build_optimizer, trainable_parameters
from tunesmith.train.preference import objective_module, summarize
from tunesmith.train.reference import attach_reference
from tunesmith.train.runlog import RunLog, validation_line
from tunesmith.train.setup import (
    build_data,
    environment_info,
    load_model,
    load_tokenizer,
    memory_gb,
    resolve_precision,
    seed_everything,
)
from tunesmith.train.state import Position, load_trainable_weights, restore_rng, restore_run, save_run
from tunesmith.train.step import DDPBackend, DeepSpeedBackend, LocalBackend, TrainStep, take_stats
from tunesmith.train.trackers import check_trackers
from tunesmith.train.validate import Validation

BEST = "best.pth"


@dataclass
class TrainResult:
    work_dir: Path
    steps: int
    total_steps: int
    epochs_completed: int
    losses: list[float] = field(default_factory=list)
    last_checkpoint: Path | None = None
    best_checkpoint: Path | None = None  # training.save_best's best.pth
    best_val_loss: float | None = None
    interrupted: bool = False
    seconds: float = 0.0


def train(cfg: TrainConfig, *, work_dir: str | os.PathLike | None = None, resume: str | os.PathLike | None = None,
          progress: bool = True, config_name: str | None = None) -> TrainResult:
    """Fine-tune the model of ``cfg``; returns a TrainResult. ``resume`` = "auto" or a checkpoint folder.
    ``work_dir`` defaults to ``cfg.work_dir``, else ``work_dirs/<config_name>``. ``progress``: live bars when
    stdout is a terminal (plain lines otherwise, and always with False); ``work_dir/train.log`` gets the lines
    either way."""
    start_time = time.perf_counter()
    work_dir = Path(work_dir or default_work_dir(cfg, config_name)).resolve()
    if cfg.distributed.deepspeed:  # before the work dir exists: a refused run leaves nothing behind
        deepspeed_config_path(cfg.distributed.deepspeed)  # an unknown name fails here, before anything slow
        try:
            import deepspeed as _  # noqa: F401
        except ImportError as exc:
            raise TunesmithError("--deepspeed needs the deepspeed package, which is not installed",
                                 "pip install 'tunesmith[deepspeed]' (or pip install deepspeed)") from exc
    check_trackers(cfg.logging.trackers())  # a tracker that is not installed: one line, before anything slow
    new_work_dir = not work_dir.exists()
    make_parent(work_dir / "metrics.jsonl")  # creates it, or says in one line what is in the way
    env = setup_distributed(deepspeed=bool(cfg.distributed.deepspeed),
                            timeout_minutes=max(30.0, cfg.distributed.dataset_timeout_minutes))
    try:
        with RunLog(work_dir if env.is_main else None, append=resume is not None, progress=progress,
                    interval=cfg.training.log_interval, start_time=start_time) as log, library_bars(log.want_bar):
            log.print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} tunesmith train {config_name or work_dir.name}"
                      + (f" --resume {resume}" if resume is not None else ""))
            try:
                return _train(cfg, env, work_dir, resume, log, start_time)
            except torch.OutOfMemoryError as exc:  # loading, planning or the first evaluation (steps: below)
                raise oom_error(cfg, _named_zero_stage(cfg), planned=False) from exc
    except BaseException:
        if new_work_dir and env.is_main:
            _remove_if_unused(work_dir)
        raise
    finally:
        teardown_distributed()


def _named_zero_stage(cfg: TrainConfig) -> int:
    name = cfg.distributed.deepspeed or ""
    return next((stage for stage in (3, 2, 1) if f"zero{stage}" in name), 0)


def _remove_if_unused(work_dir: Path) -> None:
    """A run that failed before its first checkpoint leaves no work dir behind (its log is on the console)."""
    if work_dir.is_dir() and not any(work_dir.glob("*.pth")):
        shutil.rmtree(work_dir, ignore_errors=True)


def _resume_path(resume: Any, work_dir: Path, cfg: TrainConfig, chash: str, env: DistEnv, printer) -> Path | None:
    if resume is None:
        return None
    if str(resume) == "auto":
        path = ckpt.find_last_checkpoint(work_dir, warn=printer) if work_dir.exists() else None
        if path is None and env.is_main:
            printer(f"--resume auto: no checkpoint in {work_dir}, starting from the beginning")
    else:
        path = Path(resume)
    if path is not None:
        ckpt.check_resumable(ckpt.read_meta(path), path, cfg, chash, printer)
    return path


def _train(cfg: TrainConfig, env: DistEnv, work_dir: Path, resume: Any, log: RunLog,
           start_time: float) -> TrainResult:
    t = cfg.training
    chash = config_hash(cfg)
    printer = log.print

    # --- setup ----------------------------------------------------------------------------------------------
    resume_path = _resume_path(resume, work_dir, cfg, chash, env, printer)
    if env.is_main:
        ckpt.remove_stale_temporaries(work_dir)
    seed_everything(t.seed, t.deterministic)
    if env.device.type == "cpu":
        torch.set_flush_denormal(True)  # denormal weights (e.g. dequantized GGUF) slow CPU matmuls ~3x
    precision = resolve_precision(t.mixed_precision, env.device)
    ds_config = (resolve_deepspeed_config(cfg.distributed.deepspeed, cfg, world_size=env.world_size,
                                          precision=precision) if cfg.distributed.deepspeed else None)
    stage = zero_stage(ds_config)
    model_path = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(cfg, model_path)
    data = build_data(cfg, tokenizer, env, progress=log.want_bar, printer=printer)  # data problems before the model
    model, fast = load_model(cfg, model_path, env, precision, stage)
    params = trainable_parameters(model)
    resumed = ckpt.load_checkpoint(resume_path, rank=env.rank) if resume_path is not None else None
    if resumed is not None:
        load_trainable_weights(model, resumed["weights"], cfg.method)
    optimizer = build_optimizer(params, t, fused=env.device.type == "cuda" and ds_config is None)
    module = objective_module(model, cfg, fast.loss_options())
    printer(fast.describe())
    if cfg.training.objective == "dpo" and cfg.preference.reference_mode(cfg.method) == "precomputed":
        attach_reference(module, {"train": data.dataset, "validation": data.validation}, work_dir=work_dir,
                         resumed=resumed is not None, is_main=env.is_main, batch_size=t.batch_size,
                         precision=precision, device=env.device, host_inputs=fast.host_inputs, printer=printer)
    activation_plan = None
    if planning_wanted(fast, t.gradient_checkpointing):
        printer("fitting the compiled layers' activations into the GPU (a few compiled probe steps) ...")
        plan = fit_activations(model, module, params, cfg, longest_batch(data.dataset, data.loader_for(0)),
                               precision=precision, device=env.device, deepspeed_stage=stage,
                               world_size=env.world_size)
        activation_plan = plan.describe()
        printer(activation_plan)
        take_stats(module)  # the probe steps' numbers are not training's
    if ds_config is not None:
        backend = DeepSpeedBackend(module, optimizer, params, ds_config=ds_config, stage=stage,
                                   world_size=env.world_size, accumulation=t.accumulative_counts)
    elif env.world_size > 1:
        backend = DDPBackend(module, optimizer, params, precision=precision, device=env.device, max_norm=t.max_norm,
                             world_size=env.world_size)
    else:
        backend = LocalBackend(module, optimizer, params, precision=precision, device=env.device, max_norm=t.max_norm)
    train_step = TrainStep(backend, env.device, fast.host_inputs)
    schedule = Schedule(backend.optimizer, data.total_steps, t)

    # --- restore --------------------------------------------------------------------------------------------
    pos = Position()
    if resumed is not None:
        pos = restore_run(resumed, resume_path, backend=backend, schedule=schedule, env=env)

    # --- logs and the work dir ------------------------------------------------------------------------------
    from tunesmith.config import dump_config

    config_yaml = dump_config(cfg, work_dir.name, "config.yaml")
    environment = environment_info(env, precision, fast, activation_plan)
    metrics = MetricsWriter(work_dir, enabled=env.is_main, report_to=cfg.logging.trackers(), plot=cfg.logging.plot,
                            resume_step=pos.step if resumed is not None else None,
                            params={"config": cfg.model_dump(mode="json"), "fast_paths": environment["fast_paths"],
                                    "environment": {k: v for k, v in environment.items() if k != "fast_paths"}})
    if env.is_main:
        write_text_atomic(work_dir / "config.yaml", config_yaml)
        write_text_atomic(work_dir / "environment.json", json.dumps(environment, indent=2))
        printer(f"work dir {work_dir}\nmethod {cfg.method}, precision {precision}, {backend.name} "
                f"x{env.world_size} on {env.device.type}; trainable parameters {sum(p.numel() for p in params):,}; "
                f"{data.total_steps} steps"
                + (f"; resuming from {resume_path} at step {pos.step}" if resumed is not None else ""))
    evaluator = EvaluateChat(cfg, tokenizer, work_dir, is_main=env.is_main, printer=printer)
    validation = None
    if data.validation_batches is not None:
        validation = Validation(data.validation_batches, interval=cfg.evaluation.validation_interval(),
                                total_steps=data.total_steps, device=env.device, host_inputs=fast.host_inputs)
    if resumed is None:
        evaluator.run(model, 0)
        if validation is not None:
            held = validation.run(backend)
            first = held.values()
            metrics.log(0, first)
            unit = "tokens" if held.perplexity is not None else "pairs"
            printer(f"validation before training: {validation_line(first)} ({held.tokens} {unit})")

    # --- Ctrl-C: finish the step, save, say so ---------------------------------------------------------------
    interrupted = {"flag": False}

    def on_sigint(signum, frame):
        if interrupted["flag"]:
            raise KeyboardInterrupt
        interrupted["flag"] = True
        printer("\ninterrupt: finishing this step and saving a checkpoint (Ctrl-C again to quit at once)")

    old_handler = None
    if threading.current_thread() is threading.main_thread():
        old_handler = signal.signal(signal.SIGINT, on_sigint)

    def save(name: str, *, best: bool = False) -> Path:
        path = work_dir / name
        save_run(path, cfg=cfg, model=model, backend=backend, schedule=schedule, position=pos, env=env,
                 config_yaml=config_yaml, config_hash=chash, precision=precision, stage=stage)
        if env.is_main:
            if best:
                printer(f"saved {path} (val_loss {pos.best_val_loss:.4f} at step {pos.best_step})")
            else:
                ckpt.write_last_checkpoint(work_dir, path)
                ckpt.rotate_iter_checkpoints(work_dir, t.save_total_limit)
                metrics.plot()
                printer(f"saved {path}")
        barrier()
        return path

    # --- the loop ---------------------------------------------------------------------------------------------
    finished_before = resumed is not None and pos.step >= data.total_steps
    if finished_before:
        printer(f"{resume_path} is the end of this run ({pos.step} of {data.total_steps} steps): nothing left to "
                "train (raise training.max_steps or max_epochs to train longer)")
    log.start_steps(data.total_steps, pos.step)
    losses: list[float] = []
    last_saved: Path | None = resume_path
    last_saved_step = pos.step if resumed is not None else -1
    if resumed is not None:
        restore_rng(resumed, env)
    backend.runner.train()
    clock = time.perf_counter()
    try:
        while pos.step < data.total_steps and not interrupted["flag"]:
            with torch.random.fork_rng(devices=[]):  # creating the iterator must not draw from the torch RNG
                batches = iter(data.loader_for(pos.epoch, pos.samples_in_epoch))
            while pos.step < data.total_steps and not interrupted["flag"]:
                window = list(itertools.islice(batches, t.accumulative_counts))
                if not window:
                    break
                out = train_step(window)
                pos.samples_in_epoch += out.samples
                lr = schedule.get_last_lr()
                schedule.step()
                pos.step += 1
                if env.initialized:  # Ctrl-C reaches the ranks at slightly different moments: stop together
                    stop = torch.tensor(float(interrupted["flag"]), device=env.device)
                    torch.distributed.all_reduce(stop, op=torch.distributed.ReduceOp.MAX)
                    interrupted["flag"] = bool(stop.item())
                loss = out.loss
                if not math.isfinite(loss):
                    raise nan_error(pos.step, loss, precision)
                losses.append(loss)
                values = {"loss": loss, **summarize(out.stats), "lr": lr, "grad_norm": out.grad_norm,
                          "epoch": pos.epoch + 1,
                          "tokens_per_s": out.input_tokens * env.world_size / max(time.perf_counter() - clock, 1e-9),
                          "memory_gb": round(memory_gb(env.device), 3)}
                new_best = False
                if validation is not None and validation.due(pos.step):
                    held = validation.run(backend)
                    values.update(held.values())
                    new_best = t.save_best and (pos.best_val_loss is None or held.loss < pos.best_val_loss)
                    if new_best:
                        pos.best_val_loss, pos.best_step = held.loss, pos.step
                metrics.log(pos.step, values)
                log.step(pos.step, pos.epoch + 1, {**values, "best": new_best})

                epoch_done = pos.samples_in_epoch >= data.epoch_samples
                if epoch_done:
                    pos.epoch, pos.samples_in_epoch = pos.epoch + 1, 0
                if new_best:
                    save(BEST, best=True)
                if evaluator.due(pos.step):
                    evaluator.run(model, pos.step)
                if epoch_done and t.save_epochs:
                    last_saved, last_saved_step = save(f"epoch_{pos.epoch}.pth"), pos.step
                elif t.save_steps and pos.step % t.save_steps == 0:
                    last_saved, last_saved_step = save(f"iter_{pos.step}.pth"), pos.step
                clock = time.perf_counter()  # the next step's rate counts training, not saving or evaluating
                if epoch_done:
                    break
        if last_saved_step != pos.step:
            last_saved, last_saved_step = save(f"iter_{pos.step}.pth"), pos.step
        if not (interrupted["flag"] or finished_before) and (cfg.evaluation.every_n_steps is None
                                                             or not evaluator.due(pos.step)):
            evaluator.run(model, pos.step)
    except torch.OutOfMemoryError as exc:
        raise oom_error(cfg, stage, planned=activation_plan is not None) from exc
    finally:
        log.stop_bar()
        metrics.plot()
        metrics.close()
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
    seconds = time.perf_counter() - start_time
    if interrupted["flag"]:
        printer(f"training interrupted at step {pos.step}; checkpoint {last_saved}")
    else:
        printer(f"done: {pos.step} steps in {format_duration(seconds)}"
                + (f", last loss {losses[-1]:.4f}" if losses else "") + f"; last checkpoint {last_saved}")
    best_path = work_dir / BEST if pos.best_step is not None else None
    return TrainResult(work_dir=work_dir, steps=pos.step, total_steps=data.total_steps, epochs_completed=pos.epoch,
                       losses=losses, last_checkpoint=last_saved, best_checkpoint=best_path,
                       best_val_loss=pos.best_val_loss, interrupted=interrupted["flag"], seconds=seconds)
