"""Held-out preference pairs: how a model ranks each pair's chosen answer against its rejected one.

Pairs are encoded as DPO / ORPO training encodes them (data/pairs.py: the model's template, only the final answer
and its end-of-turn text scored, ``max_length`` counting each sequence), laid out one pair a row as training's
unpacked pair rows (data/pack.py) and scored by the function training uses (models/fast/logps.py), without
gradients. ``c`` / ``r``: the summed log-probability of a pair's chosen / rejected answer; ``n_c`` / ``n_r``: their
token counts. For each model:

- ``preference_accuracy``: share of pairs with ``c / n_c > r / n_r`` (the model's own ranking, length-normalised;
  needs no reference, so it means the same before and after training);
- ``margin``: mean over pairs of ``c / n_c - r / n_r`` (nats per token);
- ``logp_chosen`` / ``logp_rejected``: mean of ``c`` / ``r`` (nats per answer).

With a second model (``--compare``, typically the base: "before"), DPO's implicit reward of the first ("after")
with the second as its reference, un-scaled (beta = 1; train/preference.py has the definition):

- ``reward_accuracy``: share of pairs with ``(c - c_ref) > (r - r_ref)``;
- ``reward_margin``: mean of ``(c - c_ref) - (r - r_ref)``; also ``reward_chosen`` / ``reward_rejected``.

As in DPO the reference scores the same token sequences as the first model: its own encoding when that is identical,
else one more pass over the first model's (another template or system prompt); a reference with another vocabulary
gets no reward, and the report says why.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tunesmith.data.conversation import Turn
from tunesmith.data.encode import Encoded
from tunesmith.errors import TunesmithError
from tunesmith.models.fast.logps import score_pairs  # noqa: F401  (the package exports it)

REWARD_BETA = 1.0  # the reward is reported un-scaled; training logs show it times preference.beta
EXAMPLES_IN_REPORT = 5


def pair_metrics(logps: np.ndarray, tokens: np.ndarray) -> dict[str, Any]:
    """The model's own ranking of its pairs (module docstring), and the margin of each pair."""
    c, r = logps[0::2], logps[1::2]
    n_c, n_r = tokens[0::2], tokens[1::2]
    mean_c, mean_r = c / np.maximum(n_c, 1), r / np.maximum(n_r, 1)
    margins = mean_c - mean_r
    return {"pairs": int(len(c)), "preference_accuracy": float(np.mean(mean_c > mean_r)),
            "margin": float(margins.mean()), "logp_chosen": float(c.mean()), "logp_rejected": float(r.mean()),
            "chosen_tokens": float(n_c.mean()), "rejected_tokens": float(n_r.mean()),
            "per_pair_margin": margins.tolist()}


def reward_metrics(logps: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """DPO's implicit reward of `logps` relative to `reference` (the same sequences), beta = 1."""
    chosen = logps[0::2] - reference[0::2]
    rejected = logps[1::2] - reference[1::2]
    z = chosen - rejected
    return {"reward_accuracy": float(np.mean(chosen > rejected)), "reward_margin": float(z.mean()),
            "reward_chosen": float(chosen.mean()), "reward_rejected": float(rejected.mean()),
            "per_pair_reward_margin": z.tolist()}


def _same(a: Sequence[Encoded], b: Sequence[Encoded]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x.input_ids, y.input_ids) and np.array_equal(x.labels, y.labels)
                                    for x, y in zip(a, b, strict=True))


@dataclass
class _Scored:
    name: str
    samples: list[Encoded]
    logps: np.ndarray
    vocab: dict[str, int]


class PairScorer:
    """`tunesmith eval` on preference pairs: called for each loaded model as run.py calls `evaluate_model`; the
    second model is the reference of the first's reward. `finish` gives what the report adds."""

    def __init__(self) -> None:
        self.first: _Scored | None = None
        self.reward: dict[str, Any] = {}
        self.all_pairs: dict[str, bool] = {}  # no pair dropped in encoding: input pair k is encoded pair k

    def __call__(self, engine: Any, pairs: Sequence[Sequence[Turn]], opts: Any, name: str, progress: Any
                 ) -> tuple[dict, list[str]]:
        from tunesmith.data.pack import pad_id_of
        from tunesmith.data.pairs import encode_pairs

        t0 = time.perf_counter()
        tok = engine.tokenizer
        samples, stats = encode_pairs(pairs, tok, engine.template, max_length=opts.max_length,
                                      system=engine.system)
        if not samples:
            raise TunesmithError("no pair has answer tokens left after encoding",
                                 f"raise --max-length (now {opts.max_length}; it counts each answer with its prompt)")
        pad = pad_id_of(tok)

        def score(encoded: list[Encoded], what: str) -> tuple[np.ndarray, np.ndarray]:
            step = progress.task(f"{what} {name}", len(encoded) // 2)
            with engine.lock:
                return score_pairs(engine.model, encoded, batch_size=opts.batch_size, pad_id=pad, progress=step)

        logps, tokens = score(samples, "pairs   ")
        result = {**pair_metrics(logps, tokens), "truncated": dict(stats.truncated), "dropped": dict(stats.dropped)}
        self.all_pairs[name] = 2 * len(pairs) == len(samples)
        if self.first is None:
            self.first = _Scored(name, samples, logps, tok.get_vocab())
        else:
            self.reward = self._reward(name, samples, logps, tok.get_vocab(), score)
            if "reward_margin" in self.reward:
                progress.print(f"{self.first.name} relative to {name}: reward accuracy "
                               f"{self.reward['reward_accuracy']:.4f}  reward margin "
                               f"{self.reward['reward_margin']:+.4f} (beta = 1)")
        result["seconds"] = time.perf_counter() - t0
        return result, []

    def _reward(self, name: str, samples: list[Encoded], logps: np.ndarray, vocab: dict[str, int],
                score: Callable[[list[Encoded], str], tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
        first = self.first
        if vocab != first.vocab:
            return {"reference": name, "text": None,
                    "note": f"`{name}` has another vocabulary than `{first.name}`, so it cannot score the same "
                            "token sequences; the reward needs the same tokenizer"}
        if _same(samples, first.samples):
            reference, text = logps, "same"
        else:  # another template or system prompt: score the first model's sequences
            reference, text = score(first.samples, "reference")[0], "rescored"
        return {"reference": name, "text": text, **reward_metrics(first.logps, reference)}

    def finish(self, models: list[dict], pairs: Sequence[Sequence[Turn]]) -> dict[str, Any]:
        """Moves the reward into the first model's metrics; returns the report's pair fields (kind, reward,
        examples)."""
        reward = dict(self.reward)
        metrics = {k: reward.pop(k) for k in list(reward) if k.startswith(("reward_", "per_pair_reward"))}
        if models and metrics:
            models[0].update(metrics)
        if reward and models:
            reward.update(policy=models[0]["name"], beta=REWARD_BETA)
        examples = []
        for i, turns in enumerate(pairs[:EXAMPLES_IN_REPORT]):
            last = turns[-1]
            margins = {m["name"]: m["per_pair_margin"][i] for m in models if self.all_pairs.get(m["name"])}
            examples.append({"index": i, "prompt": last.input, "chosen": last.output, "rejected": last.rejected,
                             "margins": margins})
        return {"kind": "pairs", "reward": reward or None, "examples": examples}

