"""Held-out loss / perplexity on encoded conversations, and ROUGE-L / BLEU against reference answers.

Loss counts only the label positions the data stage marks (the replies and their end-of-turn token): token
`t` is predicted from positions `< t`, so logits[:, :-1] meet labels[:, 1:]. The corpus loss is the mean over
all those tokens (token-weighted, not a mean of per-sample means), and perplexity = exp(that mean).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tunesmith.errors import TunesmithError
from tunesmith.train.validate import token_weighted

IGNORE_INDEX = -100


@dataclass
class LossResult:
    loss: float  # mean cross-entropy per loss token (nats)
    perplexity: float
    loss_tokens: int
    samples: int
    per_sample: list[float]  # mean loss of each sample, in input order

    def as_dict(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "loss_tokens": self.loss_tokens,
                "samples": self.samples}


def _batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped by length (longest first) so that padded batches stay under `max_tokens`."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = lengths[cur[0]] if cur else lengths[i]
        if cur and width * (len(cur) + 1) > max_tokens:
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def token_losses(model, samples: Sequence, *, pad_id: int = 0, max_batch_tokens: int = 4096,
                 progress: Callable[[int], None] | None = None) -> LossResult:
    """Loss over `samples` (objects with `input_ids` and `labels` arrays, labels unshifted, -100 = no loss)."""
    import torch
    import torch.nn.functional as F

    if not samples:
        raise TunesmithError("no samples to evaluate", "check --data and --max-samples")
    device = next(model.parameters()).device
    sums = np.zeros(len(samples), dtype=np.float64)
    counts = np.zeros(len(samples), dtype=np.int64)
    lengths = [len(s.input_ids) for s in samples]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for idx in _batches(lengths, max_batch_tokens):
                width = max(lengths[i] for i in idx)
                ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                labels = torch.full((len(idx), width), IGNORE_INDEX, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    n = lengths[i]
                    ids[row, :n] = torch.as_tensor(np.asarray(samples[i].input_ids, dtype=np.int64))
                    labels[row, :n] = torch.as_tensor(np.asarray(samples[i].labels, dtype=np.int64))
                    mask[row, :n] = 1
                ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1, :].float()
                target = labels[:, 1:]
                ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                     ignore_index=IGNORE_INDEX, reduction="none").view(target.shape)
                valid = target != IGNORE_INDEX
                row_sum = (ce * valid).sum(dim=1).double().cpu().numpy()
                row_cnt = valid.sum(dim=1).cpu().numpy()
                for row, i in enumerate(idx):
                    sums[i], counts[i] = row_sum[row], row_cnt[row]
                if progress is not None:
                    progress(len(idx))
    finally:
        if was_training:
            model.train()
    total = int(counts.sum())
    mean, perplexity = token_weighted(float(sums.sum()), total)  # the rule training's validation loss uses
    per_sample = [float(s / c) if c else float("nan") for s, c in zip(sums, counts, strict=True)]
    return LossResult(mean, perplexity, total, len(samples), per_sample)


def _need(module: str, extra: str = "eval"):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise TunesmithError(f"generation metrics need the {module.split('.')[0]} package, which is not installed",
                             f"pip install 'tunesmith[{extra}]' (or pass --max-new-tokens 0 for loss only)") from None


_WORD = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]|\w+")


class UnicodeTokenizer:
    """Lower-cased words of any script, one token per CJK character. rouge-score's default tokenizer keeps
    only [a-z0-9] and so scores Russian or Chinese answers (a large share of oasst1) as empty."""

    def tokenize(self, text: str) -> list[str]:
        return _WORD.findall(text.lower())


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (rouge-score's LCS scorer, Unicode-aware tokens), in [0, 1]."""
    rouge_scorer = _need("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=UnicodeTokenizer())
    if not predictions:
        return 0.0
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]
    return float(sum(scores) / len(scores))


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu, default 13a tokenization), in [0, 100]."""
    sacrebleu = _need("sacrebleu")
    if not predictions:
        return 0.0
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)
