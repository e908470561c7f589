"""`tunesmith eval` on preference pairs (evaluate/preference.py): the scores against each sequence scored alone with
full logits, the reward of a model against itself (exactly nothing), a reference that renders the pairs otherwise
or has another vocabulary, the report, and format detection."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tunesmith.cli.main import build_app
from tunesmith.data.pairs import encode_pairs, preference_map_fn
from tunesmith.errors import TunesmithError
from tunesmith.evaluate.preference import PairScorer, pair_metrics, score_pairs
from tunesmith.evaluate.run import EvalOptions, _Progress, detect_format

PAIRS = [
    {"prompt": "hello there", "chosen": "general kenobi", "rejected": "who are you"},
    {"prompt": "what is two plus two", "chosen": "four",
     "rejected": "five, of course, and a much longer answer than the chosen one"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                  {"role": "user", "content": "and then?"},
                  {"role": "assistant", "chosen": "bye now", "rejected": "no"}]},
    {"prompt": [{"role": "user", "content": "tell me about the model"}],
     "chosen": [{"role": "assistant", "content": "it learns to answer questions"}],
     "rejected": [{"role": "assistant", "content": "it does not"}]},
    {"prompt": "a much longer question about many different things at once", "chosen": "a short one",
     "rejected": "a long one"},
]


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    return model, tok


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairdata") / "pairs-test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PAIRS), encoding="utf-8")
    return path


def by_hand(model, samples) -> tuple[np.ndarray, np.ndarray]:
    """Each sequence alone, full logits, log_softmax: (summed log-probability of its scored tokens, their count)."""
    logps, counts = [], []
    with torch.no_grad():
        for s in samples:
            ids = torch.as_tensor(s.input_ids, dtype=torch.long)[None]
            logits = model(input_ids=ids).logits[0, :-1].float()
            targets = torch.as_tensor(s.labels, dtype=torch.long)[1:]
            keep = targets != -100
            picked = torch.log_softmax(logits, -1)[keep].gather(1, targets[keep, None])
            logps.append(float(picked.sum()))
            counts.append(int(keep.sum()))
    return np.array(logps), np.array(counts)


def expected_metrics(logps: np.ndarray, counts: np.ndarray) -> dict[str, float]:
    c, r, n_c, n_r = logps[0::2], logps[1::2], counts[0::2], counts[1::2]
    wins = [c[k] / n_c[k] > r[k] / n_r[k] for k in range(len(c))]
    return {"preference_accuracy": sum(wins) / len(c),
            "margin": sum(c[k] / n_c[k] - r[k] / n_r[k] for k in range(len(c))) / len(c),
            "logp_chosen": sum(c) / len(c), "logp_rejected": sum(r) / len(r)}


def encoded(tok, system: str = ""):
    samples, _ = encode_pairs([preference_map_fn(r) for r in PAIRS], tok, "auto", max_length=256, system=system)
    assert len(samples) == 2 * len(PAIRS)
    return samples


@pytest.fixture(scope="module")
def hand(tiny):
    model, tok = tiny
    samples = encoded(tok)
    return samples, *by_hand(model, samples)


def test_scores_equal_each_sequence_alone_with_full_logits(tiny, hand):
    model, tok = tiny
    samples, want, counts = hand
    for batch_size in (1, 3):  # one pair a forward; padded rows of unequal pairs with a short last batch
        logps, tokens = score_pairs(model, samples, batch_size=batch_size, pad_id=tok.pad_token_id)
        np.testing.assert_allclose(logps, want, atol=1e-5, rtol=1e-5)
        assert tokens.tolist() == counts.tolist() == [s.num_loss_tokens for s in samples]
        got = pair_metrics(logps, tokens)
        for key, value in expected_metrics(want, counts).items():
            assert got[key] == pytest.approx(value, abs=1e-5), key
        assert got["pairs"] == len(PAIRS) and len(got["per_pair_margin"]) == len(PAIRS)
    assert 0 < got["preference_accuracy"] < 1  # the fixture's pairs are ranked both ways
    assert model.training is False


def fake_engine(model, tok, system: str = ""):
    return SimpleNamespace(model=model, tokenizer=tok, template="auto", system=system, lock=threading.RLock())


def test_a_reference_rendering_otherwise_scores_the_first_models_text(tiny):
    model, tok = tiny
    opts = EvalOptions(model="m", data="d", batch_size=2)
    convs = [preference_map_fn(r) for r in PAIRS]
    scorer = PairScorer()
    quiet = _Progress(False)
    first, _ = scorer(fake_engine(model, tok), convs, opts, "after", quiet)
    second, _ = scorer(fake_engine(model, tok, system="You answer in one word."), convs, opts, "before", quiet)
    assert first["logp_chosen"] != pytest.approx(second["logp_chosen"], abs=1e-3)  # other prompts, other numbers
    models = [{"name": "after", **first}, {"name": "before", **second}]
    extra = scorer.finish(models, convs)
    assert extra["kind"] == "pairs" and extra["reward"]["text"] == "rescored"
    assert extra["reward"]["reference"] == "before" and extra["reward"]["beta"] == 1.0
    # the same weights on the same tokens: the reward is exactly nothing
    assert models[0]["reward_margin"] == 0.0 and models[0]["reward_accuracy"] == 0.0
    assert "reward_margin" not in models[1]


def test_a_reference_with_another_vocabulary_gets_no_reward(tiny):
    model, tok = tiny
    opts = EvalOptions(model="m", data="d", batch_size=5)
    convs = [preference_map_fn(r) for r in PAIRS]
    scorer = PairScorer()
    first, _ = scorer(fake_engine(model, tok), convs, opts, "after", _Progress(False))
    scorer.first.vocab = {"<another>": 0}
    second, _ = scorer(fake_engine(model, tok), convs, opts, "before", _Progress(False))
    models = [{"name": "after", **first}, {"name": "before", **second}]
    extra = scorer.finish(models, convs)
    assert "reward_margin" not in models[0] and "another vocabulary" in extra["reward"]["note"]


def test_no_answer_left_is_a_user_error(tiny):
    model, tok = tiny
    with pytest.raises(TunesmithError, match="max-length"):
        PairScorer()(fake_engine(model, tok), [preference_map_fn(PAIRS[4])], EvalOptions("m", "d", max_length=4),
                     "m", _Progress(False))


def test_cli_report_side_by_side_equals_by_hand(tiny_llama, hand, pairs_file, tmp_path):
    out = tmp_path / "report"
    res = CliRunner().invoke(build_app(), ["eval", str(tiny_llama), "--data", str(pairs_file), "--compare",
                                           str(tiny_llama), "--batch-size", "2", "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert {p.name for p in out.iterdir()} == {"report.md", "report.json", "report.png"}
    report = json.loads((out / "report.json").read_text())
    assert report["format"] == "preference" and report["kind"] == "pairs" and report["samples"] == len(PAIRS)
    assert report["prompt_template"] == "auto"
    after, before = report["models"]
    _, want, counts = hand
    for m in (after, before):
        assert m["pairs"] == len(PAIRS) and "loss" not in m and "rougeL" not in m
        for key, value in expected_metrics(want, counts).items():
            assert m[key] == pytest.approx(value, abs=1e-5, rel=1e-5), key
    # the same model as its own reference: exactly no reward, and no pair ranked better
    assert after["reward_margin"] == 0.0 and after["reward_accuracy"] == 0.0
    assert after["reward_chosen"] == 0.0 and after["reward_rejected"] == 0.0
    assert after["per_pair_reward_margin"] == [0.0] * len(PAIRS)
    assert not any(k.startswith("reward") for k in before)
    assert report["reward"] == {"reference": before["name"], "text": "same", "policy": after["name"], "beta": 1.0}
    assert len(report["examples"]) == len(PAIRS) and report["examples"][0]["chosen"] == "general kenobi"
    md = (out / "report.md").read_text()
    for row in ("| preference accuracy |", "| margin (nats / token) |", "| reward accuracy |",
                "| reward margin (nats, beta = 1) |", "| mean log p(chosen) (nats) |", "| change |", "## Pairs"):
        assert row in md, row
    assert "un-scaled (beta = 1" in md and "ROUGE" not in md
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_named_format_and_max_samples(tiny_llama, tmp_path):
    hh = tmp_path / "hh.jsonl"
    rows = [{"chosen": f"\n\nHuman: say {w}\n\nAssistant: {w}", "rejected": f"\n\nHuman: say {w}\n\nAssistant: no"}
            for w in ("hello", "world", "thank you")]
    hh.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "r"
    res = CliRunner().invoke(build_app(), ["eval", str(tiny_llama), "--data", str(hh), "--format", "hh_rlhf",
                                           "--max-samples", "2", "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    (m,) = report["models"]
    assert report["format"] == "hh_rlhf" and report["samples"] == 2 and m["pairs"] == 2
    assert report["reward"] is None and "reward_margin" not in m
    assert "reward" not in (out / "report.md").read_text()


def test_detect_format_picks_preference(tmp_path, pairs_file):
    def detect(rec) -> str:
        p = tmp_path / "one.jsonl"
        p.write_text(json.dumps(rec) + "\n", encoding="utf-8")
        return detect_format(str(p))

    assert detect_format(str(pairs_file)) == "preference"
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert detect({"prompt": "q", "chosen": messages, "rejected": messages, "messages": messages}) == "preference"
    hh = {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}
    assert detect(hh) == "preference"
    assert detect({"conversation": [{"input": "q", "chosen": "a", "rejected": "b"}]}) == "preference"
    assert detect({"messages": [messages[0], {"role": "assistant", "chosen": "a", "rejected": "b"}]}) == "preference"
    # answers, not pairs, read as before
    assert detect({"conversation": [{"input": "q", "output": "a"}]}) == "conversation"
    assert detect({"messages": messages}) == "openai"
    assert detect({"input": "q", "output": "a"}) == "default"
