"""`tunesmith serve` with the official openai client against SmolLM2 on a real loopback server."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.timeouts import TIMEOUT, wait_for

openai = pytest.importorskip("openai", reason="the openai client is needed: pip install openai")

API_KEY = "sk-test-tunesmith"  # the key the api_server fixture sets (conftest.py)

MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(api_server):
    base, _ = api_server
    return openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0, timeout=TIMEOUT)


def test_health_and_models(api_server, client):
    base, _ = api_server
    assert httpx.get(f"{base}/health", timeout=TIMEOUT).json()["status"] == "ok"  # no key needed for the health check
    models = client.models.list()
    assert [m.id for m in models.data] == ["smollm2-135m-instruct"]


def test_plain_completion(client):
    resp = client.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION, temperature=0,
                                          max_tokens=12)
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens <= 12 and resp.usage.prompt_tokens > 5
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")


def test_streamed_completion_matches_plain(client):
    kwargs = dict(model="smollm2-135m-instruct", messages=QUESTION, temperature=0, max_tokens=12)
    plain = client.chat.completions.create(**kwargs).choices[0].message.content
    pieces, finish, usage = [], None, None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert "".join(pieces) == plain
    assert len(pieces) > 1  # it really streamed
    assert finish in ("stop", "length") and usage is not None and usage.completion_tokens >= len(pieces)


def test_stop_sequence_and_seeded_sampling(client):
    resp = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=12,
                                          stop=["Paris"])
    assert "Paris" not in resp.choices[0].message.content and resp.choices[0].finish_reason == "stop"
    kwargs = dict(model=MODEL, messages=QUESTION, temperature=0.9, top_p=0.9, max_tokens=8, seed=7)
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    b = client.chat.completions.create(**kwargs).choices[0].message.content
    assert a == b  # the same seed gives the same sample


def test_sixteen_concurrent_requests(api_server, client):
    _, engine = api_server
    before = engine.stats.largest_batch

    def ask(i: int):
        messages = [{"role": "user", "content": f"Give me a word that rhymes with number {i}."}]
        r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=6)
        return r.choices[0].message.content, r.choices[0].finish_reason

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(ask, range(16)))
    wall = time.perf_counter() - t0
    assert len(results) == 16 and all(text and finish in ("stop", "length") for text, finish in results)
    assert max(before, engine.stats.largest_batch) > 1  # they were decoded in batches, not one by one
    print(f"\n16 concurrent requests (max_tokens=6): {wall:.1f}s wall, largest batch {engine.stats.largest_batch}")


def test_malformed_requests_get_400(api_server, client):
    base, _ = api_server
    headers = {"Authorization": f"Bearer {API_KEY}"}
    url = f"{base}/v1/chat/completions"
    for body in ({"model": MODEL}, {"model": MODEL, "messages": []},
                 {"model": MODEL, "messages": QUESTION, "temperature": 7},
                 {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]},
                 {"model": MODEL, "messages": QUESTION, "n": 3},
                 {"model": MODEL, "messages": [{"role": "assistant", "content": "hello"}]}):
        r = httpx.post(url, json=body, headers=headers, timeout=TIMEOUT)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error", err
    r = httpx.post(url, content=b"{not json", headers={**headers, "Content-Type": "application/json"}, timeout=TIMEOUT)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=0)
    assert info.value.status_code == 400 and "max_tokens" in str(info.value)


def test_missing_or_wrong_key_gets_401(api_server):
    base, _ = api_server
    r = httpx.post(f"{base}/v1/chat/completions", json={"model": MODEL, "messages": QUESTION},
                   timeout=TIMEOUT)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-wrong", max_retries=0, timeout=TIMEOUT)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_client_disconnect_stops_generation(api_server):
    base, engine = api_server
    before = engine.stats.cancelled
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
            "temperature": 0, "max_tokens": 400, "stream": True}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=TIMEOUT,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                seen += 1
            if seen >= 3:
                break  # leave: the connection closes
    wait_for(lambda: engine.stats.cancelled > before, "the server cancelling the generation", interval=0.2)
    assert engine.stats.cancelled > before
    # the engine keeps serving afterwards
    r = httpx.post(f"{base}/v1/chat/completions", json={**body, "stream": False, "max_tokens": 3},
                   headers={"Authorization": f"Bearer {API_KEY}"}, timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


def test_an_unknown_model_is_404_model_not_found(api_server):
    import httpx

    base, _ = api_server
    r = httpx.post(f"{base}/v1/chat/completions", json={"model": "gpt-9", "messages": QUESTION},
                   headers={"Authorization": f"Bearer {API_KEY}"}, timeout=TIMEOUT)
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model" and "gpt-9" in error["message"]
