"""The training loop, written out: setup, train, save, resume.

Read top to bottom:

1. `train()` resolves the run (seed, DeepSpeed, work dir, resume checkpoint), starts the process group,
   loads tokenizer + model (LoRA / QLoRA / full, from the models stage) and the dataset (rank 0 first).
2. It builds the optimizer (trainable parameters only) and the warm-up + cosine schedule, wraps the model
   for DDP or DeepSpeed when asked, and restores a checkpoint's weights / optimizer / schedule / RNG /
   data position for `--resume`.
3. The loop: an optimizer step is one *window* of `accumulative_counts` micro-batches. Their target tokens
   are counted first (all ranks), every micro-batch's loss *sum* is divided by that count, so the step's
   gradient is the token-weighted mean (see loss.py). Then clipping, the optimizer, the schedule, logs,
   evaluation prompts and checkpoints.
4. Ctrl-C finishes the current step, saves, and prints the exact command to resume.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import platform
import random
import resource
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunesmith.config import TrainConfig, config_hash
from tunesmith.errors import TunesmithError
from tunesmith.files import write_text_atomic
from tunesmith.models.fast import apply_fast_paths, loss_options, remove_fused_lora
from tunesmith.progress import callback_bar
from tunesmith.train import checkpoint as ckpt
from tunesmith.train.distributed import (
    DistEnv,
    barrier,
    deepspeed_config_path,
    gather_to_main,
    gathered_parameters,
    rank0_first,
    resolve_deepspeed_config,
    setup_distributed,
    teardown_distributed,
    zero_stage,
)
from tunesmith.train.eval_hook import EvaluateChat
from tunesmith.train.loss import (
    CausalLMLoss,
    loss_scale_for,
    scaled_micro_loss,
    window_tokens,
)
from tunesmith.train.memory import (
    card_budget,
    longest_batch,
    no_sync,
    optimizer_state_bytes,
    plan_compiled_activations,
    planning_wanted,
)
from tunesmith.train.metrics import MetricsWriter, ProgressBar
from tunesmith.train.optim import Schedule, build_optimizer, trainable_parameters


@dataclass
class TrainResult:
    work_dir: Path
    steps: int
    total_steps: int
    epochs_completed: int
    losses: list[float] = field(default_factory=list)
    last_checkpoint: Path | None = None
    interrupted: bool = False
    seconds: float = 0.0


# ----------------------------------------------------------------------------------------- small helpers
def resolve_precision(requested: str, device: torch.device) -> str:
    """'auto' -> bf16 where the GPU supports it, else fp16; CPU always fp32."""
    if device.type != "cuda":
        return "fp32"
    if requested == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return requested


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        if torch.cuda.is_available():
            # the flash, memory-efficient and cuDNN attention backwards accumulate with atomics; only the math
            # kernel gives the same gradients run after run (resume-exactness on GPU needs it)
            torch.backends.cuda.enable_flash_sdp(False)
            torch.backends.cuda.enable_mem_efficient_sdp(False)
            torch.backends.cuda.enable_cudnn_sdp(False)


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def environment_info(env: DistEnv, precision: str) -> dict[str, Any]:
    import transformers

    from tunesmith import __version__

    info: dict[str, Any] = {"tunesmith": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
                            "transformers": transformers.__version__, "platform": platform.platform(),
                            "world_size": env.world_size, "precision": precision, "cuda": torch.version.cuda,
                            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    from importlib import metadata

    for name in ("peft", "bitsandbytes", "deepspeed", "accelerate"):
        try:  # the installed version without importing it (importing deepspeed / bitsandbytes is slow and noisy)
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = None
    return info


def resume_command(work_dir: Path) -> str:
    """The command line that continues this run: this process's own `tunesmith train ...` arguments (without
    an earlier --resume) plus --work-dir and --resume auto; a generic form for the Python API."""
    args = sys.argv[1:]
    if "train" not in args:
        return f"tunesmith train <config> --work-dir {shlex.quote(str(work_dir))} --resume auto"
    args = args[args.index("train"):]
    kept, i = [], 0
    while i < len(args):
        a = args[i]
        if a == "--resume":
            i += 2 if i + 1 < len(args) and not args[i + 1].startswith("-") else 1
            continue
        if not a.startswith("--resume="):
            kept.append(a)
        i += 1
    if "--work-dir" not in kept and not any(a.startswith("--work-dir=") for a in kept):
        kept += ["--work-dir", str(work_dir)]
    return "tunesmith " + " ".join(shlex.quote(a) for a in kept) + " --resume auto"


def oom_error(cfg: TrainConfig, stage: int) -> TunesmithError:
    lower = [f"training.batch_size (now {cfg.training.batch_size}; raise accumulative_counts to keep the "
             f"effective batch)", f"data.max_length (now {cfg.data.max_length})"]
    if not cfg.training.gradient_checkpointing:
        lower.append("turn training.gradient_checkpointing on")
    if stage < 3:
        lower.append(f"a higher ZeRO stage (--deepspeed deepspeed_zero{min(stage + 1, 3) if stage else 2}"
                     f"{'' if stage else ' or deepspeed_zero3_offload'})")
    if cfg.method != "full" and cfg.quantization.bits != 4:
        lower.append("quantization.bits=4 with method qlora")
    elif cfg.method == "full":
        lower.append("method lora or qlora instead of full fine-tuning")
    return TunesmithError("CUDA out of memory during training", "lower: " + "; ".join(lower))


def nan_error(step: int, loss: float, precision: str) -> TunesmithError:
    causes = ["a learning rate too high (training.lr)", "no or a loose clipping (training.max_norm)"]
    if precision == "fp16":
        causes.insert(0, "fp16 overflow: use bf16 (training.mixed_precision=bf16) on GPUs that support it")
    causes.append("broken samples (run `tunesmith check-custom-dataset CONFIG`)")
    return TunesmithError(f"loss became {loss} at step {step}; training stopped",
                          "usual causes: " + "; ".join(causes) + ". Resume from the last good checkpoint "
                          "after fixing it")


# ----------------------------------------------------------------------------------------- model / data
def load_model_and_tokenizer(cfg: TrainConfig, env: DistEnv, precision: str, stage: int = 0):
    """Tokenizer + model prepared for cfg.method (the models stage does the work)."""
    from tunesmith import models

    path = models.resolve_model_path(cfg.model.path)
    tok_path = models.resolve_model_path(cfg.model.tokenizer_path) if cfg.model.tokenizer_path else path
    tokenizer = models.load_tokenizer(tok_path, trust_remote_code=cfg.model.trust_remote_code)
    dtype = cfg.model.dtype
    if dtype == "auto":  # weights in the training precision (fp32 on CPU) ...
        dtype = precision
        if cfg.method == "full" and stage == 0:
            dtype = "fp32"  # ... except full fine-tuning without DeepSpeed: fp32 masters, autocast computes
    q = cfg.quantization
    device_map = {"": env.device.index or 0} if q.bits is not None and env.device.type == "cuda" else None
    model = models.load_model(path, dtype=dtype, bits=q.bits, device_map=device_map,
                              trust_remote_code=cfg.model.trust_remote_code,
                              attn_implementation=cfg.model.attn_implementation, quant_type=q.quant_type,
                              double_quant=q.double_quant, compute_dtype=q.compute_dtype,
                              quant_storage=q.quant_storage)
    model = models.prepare_for_training(model, cfg)
    model = apply_fast_paths(model, cfg, deepspeed_stage=stage)
    if stage >= 3:
        # the fused LoRA forward reads lora_A / lora_B weights outside their modules' forward, where ZeRO-3
        # has not gathered them: peft's own forward under ZeRO-3
        remove_fused_lora(model)
    if cfg.quantization.bits is None:
        model.to(env.device)
    return model, tokenizer


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def adapter_config_dict(model: torch.nn.Module) -> dict[str, Any]:
    config = model.peft_config["default"].to_dict()
    out = {}
    for key, value in config.items():
        out[key] = sorted(value) if isinstance(value, set) else value
    return json.loads(json.dumps(out, default=str))


def trainable_weights(model: torch.nn.Module, method: str, stage: int) -> dict[str, torch.Tensor]:
    """What goes into the checkpoint (all ranks must call this under ZeRO-3; gathered to full tensors)."""
    if is_peft(model) and method != "full":
        from peft import get_peft_model_state_dict

        params = [p for p in model.parameters() if p.requires_grad]
        with gathered_parameters(params, stage):
            state = get_peft_model_state_dict(model)
            return {k: v.detach().cpu().clone() for k, v in state.items()}
    with gathered_parameters(list(model.parameters()), stage):
        state = model.state_dict()
        out, seen = {}, set()
        for k, v in state.items():
            ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
            if ptr in seen:  # tied weights (lm_head = embed_tokens): stored once, re-tied at load
                continue
            seen.add(ptr)
            out[k] = v.detach().cpu().clone()
        return out


def load_trainable_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], method: str) -> None:
    if is_peft(model) and method != "full":
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, weights)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise TunesmithError(f"checkpoint adapter has keys this model lacks: {unexpected[:3]}")
        return
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise TunesmithError(f"checkpoint weights do not match the model (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})", "resume with the config the checkpoint was made with")
    if hasattr(model, "tie_weights"):
        model.tie_weights()


# ----------------------------------------------------------------------------------------- train
def train(cfg: TrainConfig, *, work_dir: str | os.PathLike | None = None, resume: str | os.PathLike | None = None,
          deepspeed: str | None = None, seed: int | None = None, progress: bool = True) -> TrainResult:
    """Fine-tune the model of `cfg`; returns a TrainResult. `resume` = "auto" or a checkpoint folder."""
    start_time = time.perf_counter()
    cfg = cfg.model_copy(deep=True)
    if seed is not None:
        cfg.training.seed = seed
    if deepspeed is not None:
        cfg.distributed.deepspeed = deepspeed
        cfg = TrainConfig.model_validate(cfg.model_dump())  # re-run the cross-field checks (ZeRO-3 + QLoRA)
    work_dir = Path(work_dir or cfg.work_dir or "work_dirs/run").resolve()
    ds_name = cfg.distributed.deepspeed
    if ds_name:
        deepspeed_config_path(ds_name)  # an unknown name fails here, before anything slow
        try:
            import deepspeed as _  # noqa: F401
        except ImportError as exc:
            raise TunesmithError("--deepspeed needs the deepspeed package, which is not installed",
                                 "pip install 'tunesmith[deepspeed]' (or pip install deepspeed)") from exc

    env = setup_distributed(deepspeed=bool(ds_name), timeout_minutes=max(30.0, cfg.distributed.dataset_timeout_minutes))
    try:
        return _train(cfg, env, work_dir, resume, progress, start_time)
    finally:
        teardown_distributed()


def _train(cfg: TrainConfig, env: DistEnv, work_dir: Path, resume: Any, progress: bool,
           start_time: float) -> TrainResult:
    t = cfg.training
    chash = config_hash(cfg)
    printer = ProgressBar(1, enabled=False).print if not env.is_main else (lambda s: print(s, flush=True))

    # --- which checkpoint to resume from ------------------------------------------------------------------
    resume_path: Path | None = None
    if resume is not None:
        if str(resume) == "auto":
            resume_path = ckpt.find_last_checkpoint(work_dir) if work_dir.exists() else None
            if resume_path is None and env.is_main:
                printer(f"--resume auto: no checkpoint in {work_dir}, starting from the beginning")
        else:
            resume_path = Path(resume)
        if resume_path is not None:
            ckpt.check_config_hash(ckpt.read_meta(resume_path), chash, resume_path)
    if env.is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_temporaries(work_dir)

    seed_everything(t.seed, t.deterministic)
    if env.device.type == "cpu":
        torch.set_flush_denormal(True)  # denormal weights (e.g. dequantized GGUF) slow CPU matmuls ~3x
    precision = resolve_precision(t.mixed_precision, env.device)
    ds_config = (resolve_deepspeed_config(cfg.distributed.deepspeed, cfg, world_size=env.world_size,
                                          precision=precision) if cfg.distributed.deepspeed else None)
    stage = zero_stage(ds_config)

    # --- model, tokenizer, data -----------------------------------------------------------------------------
    model, tokenizer = load_model_and_tokenizer(cfg, env, precision, stage)
    from tunesmith.data import build_train_dataset, make_dataloader

    with callback_bar("tokenizing", enabled=env.is_main and progress) as report:
        dataset, stats = rank0_first(env, lambda: build_train_dataset(cfg, tokenizer, progress=report),
                                     timeout_minutes=cfg.distributed.dataset_timeout_minutes)
    if len(dataset) == 0:
        raise TunesmithError(f"no training samples in {cfg.data.path}",
                             "run `tunesmith check-custom-dataset CONFIG` to see what was dropped")
    if env.is_main:
        printer(stats.summary())

    def loader_for(epoch: int, start_index: int = 0):
        return make_dataloader(dataset, cfg, seed=t.seed, epoch=epoch, rank=env.rank, world_size=env.world_size,
                               start_index=start_index)

    epoch_samples = len(loader_for(0).sampler)  # this rank's samples per epoch
    micro_per_epoch = math.ceil(epoch_samples / t.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / t.accumulative_counts)
    total_steps = t.max_steps if t.max_steps is not None else steps_per_epoch * t.max_epochs

    # --- optimizer, schedule, wrappers ------------------------------------------------------------------------
    params = trainable_parameters(model)
    resumed = ckpt.load_checkpoint(resume_path, rank=env.rank) if resume_path is not None else None
    if resumed is not None:
        load_trainable_weights(model, resumed["weights"], cfg.method)
    optimizer = build_optimizer(params, t, fused=env.device.type == "cuda" and ds_config is None)
    module = CausalLMLoss(model, _loss_options(cfg))
    engine = None
    grad_divisor = 1
    if ds_config is not None:
        import deepspeed

        engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config,
                                               model_parameters=params)
        grad_divisor = t.accumulative_counts
        runner: torch.nn.Module = engine
    elif env.world_size > 1:
        runner = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    else:
        runner = module
    base_optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer) if engine is not None else optimizer
    schedule = Schedule(base_optimizer, total_steps, t)
    scaler = torch.amp.GradScaler("cuda") if (precision == "fp16" and engine is None) else None
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
                if precision != "fp32" and engine is None else contextlib.nullcontext())

    step, epoch, samples_done, losses = 0, 0, 0, []
    if resumed is not None:
        state = resumed["trainer_state"]
        if state.get("world_size", 1) != env.world_size:
            raise TunesmithError(f"checkpoint {resume_path} was written by {state.get('world_size')} processes, "
                                 f"this run has {env.world_size}", "resume with the same number of GPUs")
        opt_rest = state["optimizer"][min(env.rank, len(state["optimizer"]) - 1)]
        load_optimizer_state(base_optimizer, engine,
                             ckpt.unflatten_optimizer_state(resumed["optimizer_tensors"], opt_rest))
        schedule.load_state_dict(state["schedule"])
        if scaler is not None and state.get("grad_scaler"):
            scaler.load_state_dict(state["grad_scaler"])
        step, epoch, samples_done = state["step"], state["epoch"], state["samples_in_epoch"]

    # --- logs and the work dir ------------------------------------------------------------------------------
    metrics = MetricsWriter(work_dir, enabled=env.is_main, tensorboard=cfg.logging.tensorboard,
                            plot=cfg.logging.plot, resume_step=step if resumed is not None else None)
    from tunesmith.config import dump_config

    config_yaml = dump_config(cfg, work_dir.name, "config.yaml")
    if env.is_main:
        write_text_atomic(work_dir / "config.yaml", config_yaml)
        write_text_atomic(work_dir / "environment.json", json.dumps(environment_info(env, precision), indent=2))
        n_train = sum(p.numel() for p in params)
        printer(f"work dir {work_dir}\nmethod {cfg.method}, precision {precision}, "
                f"{'DeepSpeed ZeRO-' + str(stage) if engine is not None else ('DDP' if env.world_size > 1 else 'single process')}"
                f" x{env.world_size} on {env.device.type}; trainable parameters {n_train:,}; "
                f"{steps_per_epoch} steps/epoch, {total_steps} steps"
                + (f"; resuming from {resume_path} at step {step}" if resumed is not None else ""))
    if planning_wanted(model, cfg, env.device) and engine is None:
        def forward_backward(batch: dict[str, Any]) -> None:
            with no_sync(runner):
                with autocast:
                    loss_sum, _ = runner(batch)
                loss_sum.float().backward()

        printer("fitting the compiled layers' activations into the GPU (a few compiled probe steps) ...")
        probe = {k: (v.to(env.device) if torch.is_tensor(v) else v)
                 for k, v in longest_batch(dataset, loader_for(0)).items()}
        budget = card_budget(cfg, env.device, optimizer_state_bytes(base_optimizer, params, t.optimizer))
        printer(plan_compiled_activations(model, forward_backward, probe, budget))
    evaluator = EvaluateChat(cfg, tokenizer, work_dir, is_main=env.is_main, printer=printer)
    if resumed is None:
        evaluator.run(model, 0)

    # --- Ctrl-C: finish the step, save, say how to resume --------------------------------------------------
    interrupted = {"flag": False}

    def on_sigint(signum, frame):
        if interrupted["flag"]:
            raise KeyboardInterrupt
        interrupted["flag"] = True
        printer("\ninterrupt: finishing this step and saving a checkpoint (Ctrl-C again to quit at once)")

    old_handler = None
    if threading_main():
        old_handler = signal.signal(signal.SIGINT, on_sigint)

    def save(name: str) -> Path | None:
        path = work_dir / name
        weights = trainable_weights(model, cfg.method, stage)
        opt_tensors, opt_rest = ckpt.flatten_optimizer_state(optimizer_state(base_optimizer, engine))
        sharded = engine is not None and stage >= 1 and env.world_size > 1
        per_rank = gather_to_main({"rng": ckpt.rng_state(), "opt": (opt_tensors, opt_rest) if sharded else None},
                                  env)
        if env.is_main:
            trainer_state = {
                "step": step, "epoch": epoch, "samples_in_epoch": samples_done, "world_size": env.world_size,
                "schedule": schedule.state_dict(), "rng": [r["rng"] for r in per_rank],
                "optimizer": [r["opt"][1] for r in per_rank] if sharded else [opt_rest],
                "grad_scaler": scaler.state_dict() if scaler is not None else None,
            }
            meta = {"method": cfg.method, "epoch": epoch, "step": step, "config_hash": chash,
                    "base_model": cfg.model.path, "seed": t.seed, "world_size": env.world_size,
                    "deepspeed": cfg.distributed.deepspeed, "zero_stage": stage, "precision": precision,
                    "data_position": {"epoch": epoch, "samples_in_epoch": samples_done},
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            is_lora = is_peft(model) and cfg.method != "full"
            ckpt.save_checkpoint(
                path, meta=meta, config_yaml=config_yaml, weights=weights,
                weights_file="adapter_model.safetensors" if is_lora else "model.safetensors",
                adapter_config=adapter_config_dict(model) if is_lora else None,
                optimizer_tensors=[r["opt"][0] for r in per_rank] if sharded else [opt_tensors],
                trainer_state=trainer_state)
            ckpt.write_last_checkpoint(work_dir, path)
            ckpt.rotate_iter_checkpoints(work_dir, t.save_total_limit)
            metrics.plot()
            printer(f"saved {path}")
        barrier()
        return path

    # --- the loop ----------------------------------------------------------------------------------------
    bar = ProgressBar(total_steps, start_step=step, enabled=env.is_main and progress)
    if bar.progress is not None:
        printer = bar.print
        evaluator.printer = bar.print
    last_saved: Path | None = None
    last_saved_step = step if resumed is not None else -1
    if resumed is not None:
        ckpt.set_rng_state(resumed["trainer_state"]["rng"][min(env.rank, len(resumed["trainer_state"]["rng"]) - 1)])
        last_saved = resume_path
    runner.train()
    window_clock, window_tokens_seen = time.perf_counter(), 0
    try:
        while step < total_steps and not interrupted["flag"]:
            with torch.random.fork_rng(devices=[]):  # creating the iterator must not draw from the torch RNG
                batches = iter(loader_for(epoch, samples_done))
            while step < total_steps and not interrupted["flag"]:
                window = list(itertools.islice(batches, t.accumulative_counts))
                if not window:
                    break
                tokens = window_tokens(window, env.device)
                scale = loss_scale_for(env.world_size, grad_divisor)
                loss_sum_total = torch.zeros((), device=env.device)
                for i, batch in enumerate(window):
                    last = i == len(window) - 1
                    batch = {k: (v.to(env.device, non_blocking=True) if torch.is_tensor(v) else v)
                             for k, v in batch.items()}
                    window_tokens_seen += int(batch["input_ids"].numel())
                    if engine is not None:
                        engine.set_gradient_accumulation_boundary(last)
                    sync = no_sync(runner) if not last else contextlib.nullcontext()
                    with sync:
                        with autocast:
                            loss_sum, _ = runner(batch)
                        loss = scaled_micro_loss(loss_sum.float(), tokens, scale)
                        if engine is not None:
                            engine.backward(loss)
                        elif scaler is not None:
                            scaler.scale(loss).backward()
                        else:
                            loss.backward()
                    loss_sum_total += loss_sum.detach().float()
                    if engine is not None:
                        engine.step()  # DeepSpeed steps the optimizer only at the window boundary
                    samples_done += int(batch["input_ids"].shape[0])
                if engine is not None:
                    grad_norm = engine.get_global_grad_norm()
                    grad_norm = float(grad_norm) if grad_norm is not None else None
                else:
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    norm = torch.nn.utils.clip_grad_norm_(params, t.max_norm if t.max_norm else float("inf"))
                    grad_norm = float(norm)
                    if scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                lr = schedule.get_last_lr()
                schedule.step()
                step += 1

                if env.initialized:
                    torch.distributed.all_reduce(loss_sum_total)
                    # Ctrl-C reaches the ranks at slightly different moments: stop together
                    stop = torch.tensor(float(interrupted["flag"]), device=env.device)
                    torch.distributed.all_reduce(stop, op=torch.distributed.ReduceOp.MAX)
                    interrupted["flag"] = bool(stop.item())
                loss_value = float(loss_sum_total / tokens.clamp(min=1))
                if not math.isfinite(loss_value):
                    raise nan_error(step, loss_value, precision)
                losses.append(loss_value)
                elapsed = time.perf_counter() - window_clock
                values = {"loss": loss_value, "lr": lr, "grad_norm": grad_norm, "epoch": epoch + 1,
                          "tokens_per_s": window_tokens_seen * env.world_size / max(elapsed, 1e-9),
                          "memory_gb": round(memory_gb(env.device), 3)}
                window_clock, window_tokens_seen = time.perf_counter(), 0
                metrics.log(step, values)
                bar.update(step, epoch + 1, values)
                if bar.progress is None and env.is_main and (step % t.log_interval == 0 or step == 1):
                    printer(f"step {step}/{total_steps} epoch {epoch + 1} loss {loss_value:.4f} lr {lr:.3e} "
                            f"grad_norm {grad_norm if grad_norm is None else round(grad_norm, 4)} "
                            f"tok/s {values['tokens_per_s']:.0f}")

                epoch_done = samples_done >= epoch_samples
                if epoch_done:
                    epoch, samples_done = epoch + 1, 0
                if evaluator.due(step):
                    evaluator.run(model, step)
                if epoch_done and t.save_epochs:
                    last_saved, last_saved_step = save(f"epoch_{epoch}.pth"), step
                elif t.save_steps and step % t.save_steps == 0:
                    last_saved, last_saved_step = save(f"iter_{step}.pth"), step
                if epoch_done:
                    break
        if last_saved_step != step:
            last_saved, last_saved_step = save(f"iter_{step}.pth"), step
        if not interrupted["flag"] and (evaluator.cfg.evaluation.every_n_steps is None or not evaluator.due(step)):
            evaluator.run(model, step)
    except torch.OutOfMemoryError as exc:
        raise oom_error(cfg, stage) from exc
    finally:
        bar.close()
        metrics.plot()
        metrics.close()
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
    if interrupted["flag"] and env.is_main:
        print(f"training interrupted at step {step}; checkpoint {last_saved}\nresume with:\n  "
              f"{resume_command(work_dir)}", flush=True)
    return TrainResult(work_dir=work_dir, steps=step, total_steps=total_steps, epochs_completed=epoch,
                       losses=losses, last_checkpoint=last_saved, interrupted=interrupted["flag"],
                       seconds=time.perf_counter() - start_time)


def optimizer_state(base: torch.optim.Optimizer, engine: Any) -> dict[str, Any]:
    """The optimizer's state_dict; under ZeRO-3 the state is keyed by DeepSpeed's flat fp32 partitions,
    which are not in the param groups, so it is indexed by partition here."""
    flat = getattr(getattr(engine, "optimizer", None), "fp32_partitioned_groups_flat", None)
    if flat is None:
        return base.state_dict()
    state = {i: dict(base.state[p]) for i, p in enumerate(flat) if p in base.state}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": []} for g in base.param_groups]
    return {"state": state, "param_groups": groups}


def load_optimizer_state(base: torch.optim.Optimizer, engine: Any, state_dict: dict[str, Any]) -> None:
    flat = getattr(getattr(engine, "optimizer", None), "fp32_partitioned_groups_flat", None)
    if flat is None:
        base.load_state_dict(state_dict)
        return
    for i, entry in state_dict["state"].items():
        p = flat[int(i)]
        base.state[p] = {k: (v.to(p.device).clone() if torch.is_tensor(v) else v) for k, v in entry.items()}
    for group, saved in zip(base.param_groups, state_dict["param_groups"], strict=True):
        group.update({k: v for k, v in saved.items() if k != "params"})


def _loss_options(cfg: TrainConfig) -> dict[str, Any]:
    return loss_options(cfg)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
