"""Eval metrics on their own: loss only on answers, perplexity = exp(mean token loss), ROUGE-L / BLEU on
known strings, batching that does not change the numbers."""

from __future__ import annotations

import math

import pytest
import torch

from tunesmith.data.conversation import Turn
from tunesmith.data.encode import IGNORE_INDEX, encode_records
from tunesmith.evaluate.metrics import bleu, rouge_l, token_losses


def test_rouge_l_known_strings():
    pytest.importorskip("rouge_score")
    # LCS "the cat on the mat" = 5 of 6 words each way -> F1 5/6
    assert rouge_l(["the cat is on the mat"], ["the cat sat on the mat"]) == pytest.approx(5 / 6)
    assert rouge_l(["identical answer"], ["identical answer"]) == pytest.approx(1.0)
    assert rouge_l(["nothing shared"], ["completely different"]) == 0.0
    # non-Latin scripts are scored (rouge-score's default tokenizer would drop them)
    assert rouge_l(["Привет мир"], ["привет мир"]) == pytest.approx(1.0)
    assert rouge_l(["a b", "x"], ["a b", "y"]) == pytest.approx(0.5)  # mean over samples


def test_bleu_known_strings():
    pytest.importorskip("sacrebleu")
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert bleu(["zzz qqq"], ["the cat sat on the mat"]) == pytest.approx(0.0, abs=1e-6)
    partial = bleu(["the cat is on the mat"], ["the cat sat on the mat"])
    assert 0 < partial < 100
    import sacrebleu

    assert partial == pytest.approx(sacrebleu.corpus_bleu(["the cat is on the mat"],
                                                          [["the cat sat on the mat"]]).score)


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    return model, tok


CONVS = [
    [Turn("hello there", "general kenobi")],
    [Turn("what is two plus two", "four"), Turn("and three plus three", "six, of course")],
    [Turn("a much longer question about many different things at once", "a short one")],
]


def _manual(model, sample) -> tuple[float, int]:
    ids = torch.as_tensor(sample.input_ids, dtype=torch.long)[None]
    labels = torch.as_tensor(sample.labels, dtype=torch.long)[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    target = labels[0, 1:]
    keep = target != IGNORE_INDEX
    ce = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
    return float(ce), int(keep.sum())


def test_loss_counts_only_answer_tokens_and_perplexity_is_exp_mean(tiny):
    model, tok = tiny
    samples, _ = encode_records(CONVS, tok, "auto", max_length=256)
    result = token_losses(model, samples, pad_id=tok.pad_token_id or 0, max_batch_tokens=10_000)
    sums, counts = zip(*(_manual(model, s) for s in samples), strict=True)
    assert result.loss_tokens == sum(counts) == sum(s.num_loss_tokens for s in samples)
    assert result.loss == pytest.approx(sum(sums) / sum(counts), rel=1e-4)
    assert result.perplexity == pytest.approx(math.exp(result.loss), rel=1e-9)
    assert result.per_sample == pytest.approx([s / c for s, c in zip(sums, counts, strict=True)], rel=1e-4)
    # the prompt side never counts: far fewer scored tokens than tokens
    assert result.loss_tokens < sum(len(s.input_ids) for s in samples) / 2
    # the scored tokens are exactly the answers plus their end-of-turn token
    answers = sum(len(tok(t.output + "<|im_end|>", add_special_tokens=False)["input_ids"]) for c in CONVS for t in c)
    assert abs(result.loss_tokens - answers) <= len(CONVS) * 2  # (a trailing newline may be included)


def test_changing_the_prompt_does_not_change_which_tokens_count(tiny):
    model, tok = tiny
    a, _ = encode_records([[Turn("short", "the same answer")]], tok, "auto", max_length=256)
    b, _ = encode_records([[Turn("a very much longer question than before", "the same answer")]], tok, "auto",
                          max_length=256)
    ra = token_losses(model, a)
    rb = token_losses(model, b)
    assert ra.loss_tokens == rb.loss_tokens


def test_batching_and_padding_do_not_change_the_loss(tiny):
    model, tok = tiny
    samples, _ = encode_records(CONVS, tok, "auto", max_length=256)
    one_by_one = token_losses(model, samples, max_batch_tokens=1)  # every sample alone
    together = token_losses(model, samples, max_batch_tokens=100_000)
    assert together.loss == pytest.approx(one_by_one.loss, rel=1e-4)
    assert together.per_sample == pytest.approx(one_by_one.per_sample, rel=1e-4)


def test_no_samples_is_a_user_error(tiny):
    from tunesmith.errors import TunesmithError

    with pytest.raises(TunesmithError):
        token_losses(tiny[0], [])
