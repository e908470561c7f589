"""End-to-end speed of the product: `tunesmith train` run exactly as a user runs it, beside a plain loop (or, for
preference tuning, TRL) on the same model folder and the same data, in one call (``tunesmith bench --end-to-end``).

1. A model folder of a named shape is written with random weights (Llama layout, safetensors) and a tokenizer;
   when a row is a dpo / orpo one, also the pairs file (:mod:`tunesmith.bench.pairs`: ``{"prompt", "chosen",
   "rejected"}`` cut from the ``--data`` text with the folder's tokenizer, each sequence at most ``pair_length`` -
   16 tokens once the internlm_chat template is applied, so neither side truncates).
2. Each row runs in its own process, one after another:

   * ``plain METHOD [zero2]``: the plain transformers + peft (+ bitsandbytes, + DeepSpeed ZeRO-2) loop of
     :mod:`tunesmith.bench.plain`;
   * ``train METHOD [zero2] [@plain | @GIB] [key=value ...]``: ``tunesmith train internlm_chat_7b_METHOD_oasst1_e3
     --set model.path=... data.path=... training.max_steps=N ...`` (and ``--deepspeed deepspeed_zero2``);
     ``@plain`` sets ``speed.memory_fraction`` to the peak of the plain row of the same method, ``@GIB`` to that
     many GiB of the card;
   * ``trl dpo|orpo METHOD``: TRL's DPOTrainer / ORPOTrainer on the pairs (:mod:`tunesmith.bench.trl_pref`; TRL
     must be importable in that process);
   * ``train METHOD dpo|orpo [zero2] [@trl | @GIB] [key=value ...]``: the same command on the pairs, with
     ``training.objective=dpo|orpo data.format=preference data.path=PAIRS data.max_length=PAIR_LENGTH
     data.pack_to_max_length=true`` (a packed row holds 2 x PAIR_LENGTH tokens: one pair); ``@trl`` sets
     ``speed.memory_fraction`` to the peak of the trl row of the same objective and method.

   The train rows' numbers are read from the run's own ``metrics.jsonl`` (``tokens_per_s``, ``memory_gb``; dpo /
   orpo rows also ``reward_accuracy``, ``reward_margin``) and its log (the fast-path and activation-plan lines); the
   process is stopped once the last step is logged (the final checkpoint is not the subject). ``tokens_per_s``
   counts the positions of the micro-batch rows; a packed row of one batch is not padded, so at the recipes'
   ``training.batch_size`` 1 a dpo / orpo row counts real tokens (prompt twice, answers), as the trl row does.
3. The table: the median tokens/s of the steps after ``warmup``, the peak GiB, the ratio to the baseline row of
   the same family: the plain row of the same method (and DeepSpeed or not), or for a dpo / orpo train row the
   trl row of the same objective and method.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tunesmith.bench.rows import (
    DEFAULT_ROWS,
    Row,
    RowResult,
    parse_rows,
)
from tunesmith.errors import TunesmithError
from tunesmith.train.metrics import read_metrics

BUNDLED_DATA = Path(__file__).resolve().parents[2] / "examples" / "data" / "oasst1_guanaco_eval.jsonl"

@dataclass
class E2EOptions:
    model_shape: str = "internlm-7b"
    rows: str = DEFAULT_ROWS
    steps: int = 12
    warmup: int = 3
    accumulate: int = 4
    seq_len: int = 2048
    data: str = str(BUNDLED_DATA)
    tokenizer: str = "builtin:smollm2-135m-instruct"
    work: str = "bench_e2e"
    time_budget_s: float = 540.0
    json_out: str | None = None
    row_timeout_s: float = 400.0
    pair_length: int = 1024  # dpo / orpo rows: tokens per sequence (chosen or rejected); a packed row holds two


def write_model_folder(shape_name: str, folder: Path, tokenizer: str, seq_len: int) -> Path:
    """A random-weight model of ``shape_name`` (bf16 safetensors, made on the GPU when there is one) with the
    tokenizer of ``tokenizer`` (the vocabulary grows to the tokenizer's when the shape's is smaller); kept when it
    is there already."""
    import dataclasses

    import torch

    from tunesmith import models
    from tunesmith.bench.baseline import build_base_model
    from tunesmith.bench.shapes import SHAPES

    if (folder / "config.json").exists():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = models.load_tokenizer(tokenizer)
    shape = SHAPES[shape_name]
    shape = dataclasses.replace(shape, vocab=max(shape.vocab, len(tok)))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_base_model(shape, device, seq_len, dtype=torch.bfloat16)
    model.save_pretrained(tmp, max_shard_size="4GB")
    del model
    tok.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def tunesmith_command() -> list[str]:
    """The installed `tunesmith` command, else this Python's ``-m tunesmith`` (the same entry point)."""
    exe = shutil.which("tunesmith")
    return [exe] if exe else [sys.executable, "-m", "tunesmith"]


class EndToEnd:
    def __init__(self, o: E2EOptions):
        self.o = o
        self.work = Path(o.work).resolve()
        self.results: list[RowResult] = []
        # the baseline rows' (plain, trl) numbers by family: the ratio and @plain / @trl of later rows
        self.base_peaks: dict[str, float] = {}
        self.base_rates: dict[str, float] = {}
        self.pairs: Path | None = None
        self.start = time.perf_counter()
        self.card_gib = 0.0

    def data_overrides(self) -> list[str]:
        return ["data.format=oasst1", "data.prompt_template=internlm_chat", f"data.max_length={self.o.seq_len}"]

    def pair_overrides(self, objective: str) -> list[str]:
        """The data and objective of a dpo / orpo train row: the pairs file, ``pair_length`` per sequence, packed
        (two sequences, one pair, to a row), rendered with the template the pairs were sized with."""
        from tunesmith.bench.pairs import TEMPLATE

        return [f"training.objective={objective}", "data.format=preference", f"data.path={self.pairs}",
                f"data.max_length={self.o.pair_length}", "data.pack_to_max_length=true",
                f"data.prompt_template={TEMPLATE}"]

    def write_pairs(self) -> Path:
        from tunesmith import models
        from tunesmith.bench.pairs import write_pairs

        path = self.work / f"pairs-{self.o.pair_length}.jsonl"
        count = max(64, self.o.steps * self.o.accumulate)
        info = write_pairs(path, models.load_tokenizer(self.folder), source=self.o.data, pairs=count,
                           max_length=self.o.pair_length, prompt_tokens=self.o.pair_length // 4)
        print(f"[e2e] pairs {path}: {info.summary()}", flush=True)
        return path

    def run(self) -> list[RowResult]:
        import torch

        rows = parse_rows(self.o.rows)
        if torch.cuda.is_available():
            self.card_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
        self.work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        self.folder = write_model_folder(self.o.model_shape, self.work / f"model-{self.o.model_shape}",
                                         self.o.tokenizer, self.o.seq_len)
        print(f"[e2e] model folder {self.folder} ready in {time.perf_counter() - t0:.0f}s", flush=True)
        if any(row.objective for row in rows):
            self.pairs = self.write_pairs()
        try:
            for row in rows:
                left = self.o.time_budget_s - (time.perf_counter() - self.start)
                if left < 30:
                    self.results.append(RowResult(row.text, note="skipped: time budget"))
                    continue
                result = self.run_row(row, min(self.o.row_timeout_s, left))
                self.results.append(result)
                print(f"[e2e] {row.text}: {result.tokens_per_s:,.0f} tok/s, {result.peak_gib:.2f} GiB "
                      f"in {result.seconds:.0f}s {result.error}", flush=True)
        finally:
            self.finish()
        return self.results

    def run_row(self, row: Row, timeout: float) -> RowResult:
        res = RowResult(row.text)
        t0 = time.perf_counter()
        try:
            if row.kind == "plain":
                self.run_plain(row, res, timeout)
            elif row.kind == "trl":
                self.run_trl(row, res, timeout)
            else:
                self.run_train(row, res, timeout)
            timed = res.steps[self.o.warmup:] or res.steps
            res.tokens_per_s = statistics.median(timed) if timed else 0.0
            if row.kind == row.baseline and res.tokens_per_s:
                self.base_peaks[row.family], self.base_rates[row.family] = res.peak_gib, res.tokens_per_s
            base = self.base_rates.get(row.family)
            res.ratio = res.tokens_per_s / base if base and res.tokens_per_s else 0.0
        except Exception as exc:  # noqa: BLE001 - one row failing must not lose the table
            res.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        res.seconds = time.perf_counter() - t0
        return res

    def run_plain(self, row: Row, res: RowResult, timeout: float) -> None:
        out = self.work / f"plain-{row.family.replace(' ', '-')}.json"
        log = out.with_suffix(".log")
        cmd = [sys.executable, "-m", "tunesmith.bench.plain", "--model", str(self.folder), "--method", row.method,
               "--data", self.o.data, "--steps", str(self.o.steps), "--accumulate", str(self.o.accumulate),
               "--out", str(out), "--set", *self.data_overrides()] + (["--deepspeed"] if row.deepspeed else [])
        with open(log, "w") as fh:
            code = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
        if code != 0:
            raise RuntimeError(f"plain loop exited {code}: {_tail(log)}")
        data = json.loads(out.read_text())
        res.steps, res.peak_gib = data["tokens_per_s"], data["peak_gib"]

    def trl_command(self, row: Row, out: Path) -> list[str]:
        from tunesmith.bench.pairs import TEMPLATE

        return [sys.executable, "-m", "tunesmith.bench.trl_pref", "--model", str(self.folder), "--data",
                str(self.pairs), "--objective", str(row.objective), "--method", row.method, "--steps",
                str(self.o.steps), "--warmup", str(self.o.warmup), "--accumulate", str(self.o.accumulate),
                "--max-length", str(self.o.pair_length), "--template", TEMPLATE, "--work",
                str(out.with_suffix("")) + "-trainer", "--row", row.text, "--json", str(out)]

    def run_trl(self, row: Row, res: RowResult, timeout: float) -> None:
        out = self.work / f"trl-{row.objective}-{row.method}.json"
        log = out.with_suffix(".log")
        out.unlink(missing_ok=True)
        cmd = self.trl_command(row, out)
        with open(log, "w") as fh:
            fh.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
            fh.flush()
            code = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
        data = json.loads(out.read_text()) if out.exists() else {}
        if code != 0 or data.get("error") or not data.get("steps"):
            raise RuntimeError(data.get("error") or f"TRL runner exited {code}: {_tail(log)}")
        res.steps, res.peak_gib, res.note = data["steps"], data["peak_gib"], data.get("note", "")

    def train_command(self, row: Row, work_dir: Path) -> list[str]:
        if row.objective:
            data = [f"model.path={self.folder}", *self.pair_overrides(row.objective)]
        else:
            data = [f"model.path={self.folder}", f"data.path={self.o.data}", *self.data_overrides()]
        sets = [*data, f"training.max_steps={self.o.steps}", f"training.accumulative_counts={self.o.accumulate}",
                "evaluation.inputs=[]"]
        if row.budget is not None:
            gib = self.base_peaks.get(row.family) if row.budget in ("plain", "trl") else float(row.budget)
            if gib is None:
                raise RuntimeError(f"@{row.budget} needs the '{row.budget} {row.family}' row before it")
            sets.append(f"speed.memory_fraction={min(1.0, gib / self.card_gib):.5f}")
        sets += row.overrides
        cmd = [*tunesmith_command(), "train", f"internlm_chat_7b_{row.method}_oasst1_e3", "--work-dir", str(work_dir),
               "--no-progress"]
        if row.deepspeed:
            cmd += ["--deepspeed", "deepspeed_zero2"]
        return cmd + ["--set", *sets]

    def run_train(self, row: Row, res: RowResult, timeout: float) -> None:
        words = row.text.split()[1:]
        name = "train-" + "-".join(w.replace("=", "_").replace("@", "at").replace("/", "_") for w in words)
        work_dir = self.work / name
        shutil.rmtree(work_dir, ignore_errors=True)
        log = self.work / f"{name}.log"
        cmd = self.train_command(row, work_dir)
        metrics = work_dir / "metrics.jsonl"
        with open(log, "w") as fh:
            fh.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
            fh.flush()
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.perf_counter() + timeout
            records: list[dict] = []
            while True:
                records = read_metrics(metrics)
                if len(records) >= self.o.steps or proc.poll() is not None or time.perf_counter() > deadline:
                    break
                time.sleep(0.5)
            if proc.poll() is None:  # the steps are logged: the final save and evaluation are not the subject
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        records = read_metrics(metrics)
        if not records:
            raise RuntimeError(f"tunesmith train logged no step (exit {proc.returncode}): {_tail(log)}")
        res.steps = [float(r["tokens_per_s"]) for r in records]
        res.peak_gib = max(float(r.get("memory_gb") or 0.0) for r in records)
        res.note = _plan_note(log.read_text(errors="replace")) + _reward_note(records)
        if len(records) < self.o.steps:
            res.note += f" (only {len(records)} steps logged)"

    def finish(self) -> None:
        print(format_e2e(self.results, self.o, self.card_gib), flush=True)
        if self.o.json_out:
            payload = {"options": asdict(self.o), "card_gib": self.card_gib,
                       "results": [asdict(r) for r in self.results]}
            tmp = self.o.json_out + ".tmp"
            Path(tmp).write_text(json.dumps(payload, indent=1))
            os.replace(tmp, self.o.json_out)


def _tail(path: Path, n: int = 400) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return " | ".join(text[-n:].splitlines()[-4:])


def _plan_note(log: str) -> str:
    """The fast-path and activation-plan lines of a training log, shortened for the table."""
    notes = []
    for line in log.splitlines():
        if line.startswith("fast paths on"):
            notes.append("compiled" if "compiled layers" in line else "eager")
        elif line.startswith("activation plan:"):
            head = line.split(";")[0].replace("activation plan: compiled layers keep ", "act ")
            notes.append(head.replace(" of their activations,", ",").replace(" layers checkpointed whole", " whole"))
    return ", ".join(notes)


def _reward_note(records: list[dict]) -> str:
    """A dpo / orpo run's last reward accuracy and margin (its metrics.jsonl), for the table."""
    last = next((r for r in reversed(records) if "reward_accuracy" in r or "reward_margin" in r), None)
    if last is None:
        return ""
    parts = [f"{name} {float(last[key]):.2f}" for key, name in (("reward_accuracy", "acc"), ("reward_margin", "margin"))
             if last.get(key) is not None]
    return ", " + ", ".join(parts) if parts else ""


def _has_preference_rows(rows: str) -> bool:
    try:
        return any(row.objective for row in parse_rows(rows))
    except TunesmithError:
        return False


def format_e2e(results: list[RowResult], o: E2EOptions, card_gib: float) -> str:
    preference = _has_preference_rows(o.rows)
    pairs = f", pairs 2 x {o.pair_length}" if preference else ""
    head = (f"\n== tunesmith bench --end-to-end: {o.model_shape}, seq {o.seq_len}{pairs}, {o.accumulate} "
            f"micro-batches a step, median of steps {o.warmup + 1}-{o.steps}; card {card_gib:.0f} GiB ==")
    cols = f"{'row':<52} {'tok/s':>8} {'peak GiB':>9} {'x base' if preference else 'x plain':>8}  note"
    lines = [head]
    if preference:
        lines.append("x base: vs the plain row of the same method; dpo / orpo train rows: vs the trl row of the same "
                     "objective and method (both count real tokens at batch 1: prompt twice, answers)")
    lines += [cols, "-" * len(cols)]
    for r in results:
        if r.error or not r.tokens_per_s:
            lines.append(f"{r.row:<52} {'-':>8} {'-':>9} {'-':>8}  {r.error or r.note}")
            continue
        ratio = f"{r.ratio:.2f}" if r.ratio else "-"
        lines.append(f"{r.row:<52} {r.tokens_per_s:>8,.0f} {r.peak_gib:>9.2f} {ratio:>8}  {r.note}")
    return "\n".join(lines)


def run_end_to_end(options: E2EOptions) -> list[RowResult]:
    from tunesmith.bench.shapes import SHAPES
    from tunesmith.errors import unknown_name_error

    if options.model_shape not in SHAPES:
        raise unknown_name_error("model shape", options.model_shape, SHAPES)
    rows = parse_rows(options.rows)  # a typo fails before the model folder is written
    if any(row.objective for row in rows) and options.pair_length < 64:
        raise TunesmithError(f"--pair-length {options.pair_length}: too short for a prompt and an answer",
                             "e.g. --pair-length 1024 (the issue's pairs are 2 x 1,024 tokens)")
    if not Path(options.data).is_file():
        raise TunesmithError(f"bench data {options.data} does not exist", "pass --data FILE (oasst1 text lines)")
    return EndToEnd(options).run()
