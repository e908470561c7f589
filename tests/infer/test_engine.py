"""The generation engine: message conversion, batched decoding equal to the single-request path, cancelling."""

from __future__ import annotations

import threading

import pytest

from tests.timeouts import wait_for
from tunesmith.data.conversation import Turn
from tunesmith.infer.engine import prompt_turns
from tunesmith.infer.sampling import SamplingConfig


def test_prompt_turns_follow_the_training_rule_with_a_turn_to_answer():
    turns, system = prompt_turns([
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": [{"type": "text", "text": "how "}, {"type": "text", "text": "are you"}]},
    ])
    assert system == "be brief"
    assert turns == [Turn("hi", "hello"), Turn("how are you", "")]
    with pytest.raises(ValueError, match="last message"):
        prompt_turns([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(ValueError, match="role"):
        prompt_turns([{"role": "robot", "content": "a"}])
    with pytest.raises(ValueError):
        prompt_turns([])


PROMPTS = ["What is the capital of France?", "Name three colors.", "Say hello.", "What is 2+2?"]


def test_batched_decoding_matches_single_requests(smollm2_engine):
    engine = smollm2_engine
    sampling = SamplingConfig(max_new_tokens=8, temperature=0)
    singles = [engine.generate(p, sampling) for p in PROMPTS]  # one after the other: the single path
    largest = engine.stats.largest_batch
    batched = engine.generate_many(PROMPTS, sampling)  # all at once: one padded batch
    assert engine.stats.largest_batch >= 2 or largest >= 2
    for one, many in zip(singles, batched, strict=True):
        assert many.ids == one.ids and many.text == one.text and many.finish_reason == one.finish_reason
    assert "Paris" in batched[0].text
    # rows of different budgets in one batch: each stops at its own limit
    mixed = engine.generate_many(PROMPTS[:2], SamplingConfig(max_new_tokens=3, temperature=0))
    assert all(r.new_tokens <= 3 for r in mixed)


def test_seeded_sampling_is_reproducible_in_a_batch(smollm2_engine):
    sampling = SamplingConfig(max_new_tokens=8, temperature=0.9, top_k=0, top_p=0.95, seed=3)
    a = smollm2_engine.generate_many([PROMPTS[1]] * 3, sampling)
    assert a[0].ids == a[1].ids == a[2].ids  # the same seed and prompt give the same sample in any row


def test_closing_a_stream_cancels_it(smollm2_engine):
    engine = smollm2_engine
    before = engine.stats.cancelled
    stream = engine.stream("Write a long story about a dragon.", SamplingConfig(max_new_tokens=300, temperature=0))
    next(stream)
    stream.close()
    wait_for(lambda: engine.stats.cancelled != before, "the engine cancelling the closed stream")
    assert engine.stats.cancelled == before + 1
    # a request cancelled while queued never runs
    cancel = threading.Event()
    cancel.set()
    it = engine.stream("Hello", SamplingConfig(max_new_tokens=5, temperature=0), cancel=cancel)
    assert list(it) == []
