"""`tunesmith serve` as a real subprocess (the CLI wiring): the openai client talks to it on a free port."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from tests.serve.conftest import free_port

openai = pytest.importorskip("openai", reason="pip install openai")


def test_cli_serve_subprocess(smollm2_path, tmp_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    env = {**os.environ, "TUNESMITH_API_KEY": "sk-cli"}
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "serve", str(smollm2_path), "--port", str(port),
                             "--prompt-template", "auto", "--model-name", "smol", "--torch-dtype", "fp32"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up: " + (tmp_path / "serve.log").read_text()
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-cli", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["smol"]
        resp = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=3, temperature=0)
        assert resp.choices[0].message.content and resp.usage.completion_tokens <= 3
        r = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10)  # the key came from TUNESMITH_API_KEY
        assert r.status_code == 401
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert f"serving smol on http://127.0.0.1:{port}/v1 (API key required)" in text
