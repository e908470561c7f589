"""`tunesmith eval`: load a model (and adapter), score held-out conversations, optionally against a second model.

For each model:
1. loss and perplexity of the reference answers, encoded by the data stage exactly as training encodes them
   (same template, loss only on the answers and their end-of-turn token);
2. with `max_new_tokens > 0`, an answer generated (greedy) for the last turn of each conversation, through the
   inference engine's batched decoding, scored against the reference with ROUGE-L and BLEU.

Preference pairs (a `pairs` format: records with chosen / rejected) are ranked instead of generated: each model's
preference accuracy and margin, and the first model's DPO reward relative to the second (preference.py).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.data.conversation import Turn
from tunesmith.errors import TunesmithError

EXAMPLES_IN_REPORT = 5


@dataclass
class EvalOptions:
    model: str
    data: str
    adapter: str | None = None
    prompt_template: str | None = None
    data_format: str = "auto"
    system: str = ""
    compare: str | None = None
    compare_adapter: str | None = None
    max_samples: int | None = None
    max_new_tokens: int = 128
    max_length: int = 2048
    batch_size: int = 8
    out: str = "eval_report"
    bits: int | None = None
    torch_dtype: str = "auto"
    trust_remote_code: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)


def _is_pair(rec: dict) -> bool:
    """chosen / rejected beside the prompt, or on the last turn of a conversation / message list."""
    if "chosen" in rec and "rejected" in rec:
        return True
    turns = rec.get("conversation", rec.get("messages"))
    return isinstance(turns, list) and bool(turns) and isinstance(turns[-1], dict) and {"chosen", "rejected"} <= set(
        turns[-1])


def detect_format(path: str) -> str:
    """Reader name from the first record's keys (preference, conversation, openai, oasst1, alpaca, sharegpt,
    default)."""
    from tunesmith.data.sources import iter_raw

    try:
        first = next(iter(iter_raw(path, split=None)))
    except StopIteration:
        raise TunesmithError(f"{path} has no records", "check --data") from None
    rec = first.data
    if isinstance(rec, list):
        return "openai"
    if not isinstance(rec, dict):
        raise TunesmithError(f"{first.where}: cannot tell the data format", "pass --format (see list-dataset-format)")
    if _is_pair(rec):
        return "preference"
    keys = set(rec)
    for key, name in (("conversation", "conversation"), ("messages", "openai"), ("conversations", "sharegpt"),
                      ("instruction", "alpaca")):
        if key in keys:
            return name
    if "text" in keys and "### Human:" in str(rec["text"]):
        return "oasst1"
    if {"input", "output"} <= keys:
        return "default"
    raise TunesmithError(f"{first.where}: cannot tell the data format from the keys {sorted(keys)}",
                         "pass --format (see `tunesmith list-dataset-format`)")


def load_conversations(path: str, fmt: str, max_samples: int | None) -> tuple[list[list[Turn]], str]:
    from tunesmith.data.readers import read_records

    if not Path(path).exists():
        raise TunesmithError(f"--data {path} does not exist", "pass a held-out file, e.g. from `tunesmith data split`")
    fmt = detect_format(path) if fmt == "auto" else fmt
    records, stats = read_records(path, fmt, split=None, max_records=max_samples)
    if stats.malformed:
        first = next(iter(stats.malformed_at.values()))[0]
        print(f"skipped {stats.malformed} malformed records of {path} (first at {first}); "
              "`tunesmith check-custom-dataset` lists them", file=sys.stderr, flush=True)
    return [list(r.turns) for r in records], fmt


class _Progress:
    """A rich progress bar with rate and ETA (or nothing)."""

    def __init__(self, enabled: bool):
        self.bar = None
        from tunesmith.progress import is_terminal

        if enabled and is_terminal():  # off a terminal (nohup, a pipe): plain lines, never wrapped
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                ProgressColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.text import Text

            class Rate(ProgressColumn):
                def render(self, task):
                    # answers finish in batches: rich's windowed speed spikes, the whole-run average does not
                    elapsed = task.finished_time if task.finished else task.elapsed
                    rate = task.completed / elapsed if elapsed else None
                    return Text(f"{rate:.2f}/s" if rate else "–/s")

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(),
                                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
            self.bar.start()

    def task(self, description: str, total: int):
        if self.bar is None:
            return lambda n=1: None
        tid = self.bar.add_task(description, total=total)
        return lambda n=1: self.bar.advance(tid, n)

    def print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _name(model: str, adapter: str | None) -> str:
    base = model.split(":", 1)[1] if model.startswith("builtin:") else Path(model).name or model
    return f"{base}+{Path(adapter).name}" if adapter else base


def evaluate_model(engine, convs: Sequence[Sequence[Turn]], opts: EvalOptions, name: str, progress: _Progress,
                   ) -> tuple[dict, list[str]]:
    """Metrics of one loaded model on the conversations (and its generated answers)."""
    from tunesmith.data.encode import encode_prompt, encode_records
    from tunesmith.data.pack import pad_id_of
    from tunesmith.evaluate.metrics import bleu, rouge_l, token_losses
    from tunesmith.infer.sampling import SamplingConfig

    t0 = time.perf_counter()
    tok = engine.tokenizer
    samples, stats = encode_records(convs, tok, engine.template, max_length=opts.max_length,
                                    system=opts.system)
    if not samples:
        raise TunesmithError("no conversation has answer tokens left after encoding",
                             f"raise --max-length (now {opts.max_length})")
    pad = pad_id_of(tok)
    step = progress.task(f"loss     {name}", len(samples))
    with engine.lock:
        loss = token_losses(engine.model, samples, pad_id=pad, max_batch_tokens=max(512, opts.batch_size *
                                                                                         opts.max_length // 4),
                            progress=step)
    result = {**loss.as_dict(), "per_sample_loss": [None if math.isnan(x) else x for x in loss.per_sample],
              "truncated": dict(stats.truncated), "dropped": dict(stats.dropped)}
    outputs: list[str] = []
    if opts.max_new_tokens > 0:
        prompts, refs = [], []
        for turns in convs:
            prompts.append(encode_prompt(tok, engine.template, list(turns), system=opts.system or None))
            refs.append(turns[-1].output)
        step = progress.task(f"generate {name}", len(prompts))
        sampling = SamplingConfig(max_new_tokens=opts.max_new_tokens, temperature=0.0)
        results = engine.generate_many(prompts, sampling, on_done=lambda _i, _r: step())
        outputs = [r.text.strip() for r in results]
        result.update({"rougeL": rouge_l(outputs, refs), "bleu": bleu(outputs, refs), "generated": len(outputs),
                       "mean_new_tokens": sum(r.new_tokens for r in results) / max(1, len(results))})
    result["seconds"] = time.perf_counter() - t0
    return result, outputs


def run_eval(opts: EvalOptions) -> dict:
    """Evaluate `opts.model` (and `opts.compare`), write the report into `opts.out`; returns the report dict."""
    from tunesmith.data.pairs import PAIRS
    from tunesmith.data.readers import get_format
    from tunesmith.evaluate.report import write_report
    from tunesmith.infer.engine import Engine

    convs, fmt = load_conversations(opts.data, opts.data_format, opts.max_samples)
    pairs = get_format(fmt).kind == PAIRS
    if pairs:  # ranked, not generated: their own scorer, called as evaluate_model is
        from tunesmith.evaluate.preference import PairScorer

        score = PairScorer()
    else:
        score = evaluate_model
    progress = _Progress(opts.progress)
    models, outputs = [], {}
    template_name = None
    try:
        for model, adapter in [(opts.model, opts.adapter)] + ([(opts.compare, opts.compare_adapter)]
                                                                if opts.compare else []):
            name = _name(model, adapter)
            if any(m["name"] == name for m in models):
                name += f"#{len(models) + 1}"
            progress.print(f"loading {model}" + (f" + {adapter}" if adapter else ""))
            engine = Engine.load(model, adapter=adapter, prompt_template=opts.prompt_template, system=opts.system,
                                 bits=opts.bits, torch_dtype=opts.torch_dtype,
                                 trust_remote_code=opts.trust_remote_code, max_batch=opts.batch_size)
            try:
                template_name = template_name or engine.template.name
                metrics, outs = score(engine, convs, opts, name, progress)
            finally:
                engine.close()
                del engine
            models.append({"name": name, "model": model, "adapter": adapter, **metrics})
            outputs[name] = outs
            progress.print(_summary(models[-1]))
    finally:
        progress.close()
    examples = []
    if opts.max_new_tokens > 0 and not pairs:
        for i, turns in enumerate(convs[:EXAMPLES_IN_REPORT]):
            examples.append({"index": i, "prompt": turns[-1].input, "reference": turns[-1].output,
                             "outputs": {name: outs[i] for name, outs in outputs.items() if i < len(outs)}})
    report = {"data": str(opts.data), "format": fmt, "kind": "conversations", "samples": len(convs),
              "max_samples": opts.max_samples, "prompt_template": template_name,
              "max_new_tokens": 0 if pairs else opts.max_new_tokens, "max_length": opts.max_length,
              "models": models, "examples": examples, "outputs": outputs}
    if pairs:
        report.update(score.finish(models, convs))
    paths = write_report(report, opts.out)
    report["files"] = {k: str(v) for k, v in paths.items()}
    return report


def _summary(m: dict) -> str:
    if "preference_accuracy" in m:
        return (f"{m['name']}: preference accuracy {m['preference_accuracy']:.4f}  margin {m['margin']:+.4f} "
                f"nats/token  ({m['pairs']} pairs)")
    text = f"{m['name']}: loss {m['loss']:.4f}  perplexity {m['perplexity']:.3f}  ({m['loss_tokens']} answer tokens)"
    if "rougeL" in m:
        text += f"  ROUGE-L {m['rougeL']:.4f}  BLEU {m['bleu']:.2f}"
    return text


def load_report(out_dir: str | Path) -> dict:
    return json.loads((Path(out_dir) / "report.json").read_text(encoding="utf-8"))
