"""`tunesmith serve` as a real subprocess (the CLI wiring): the openai client talks to it on a free port."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from tests.serve.conftest import free_port
from tests.timeouts import TIMEOUT, wait_for

openai = pytest.importorskip("openai", reason="pip install openai")


def test_cli_serve_subprocess(smollm2_path, tmp_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    env = {**os.environ, "TUNESMITH_API_KEY": "sk-cli"}
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "serve", str(smollm2_path), "--port", str(port),
                             "--prompt-template", "auto", "--model-name", "smol", "--torch-dtype", "fp32"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        def up() -> bool:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
            except httpx.TransportError:  # not listening yet, or a probe slower than 2 s: ask again
                return False

        wait_for(up, lambda: "server did not come up: " + (tmp_path / "serve.log").read_text(), interval=0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-cli", max_retries=0,
                               timeout=TIMEOUT)
        assert [m.id for m in client.models.list().data] == ["smol"]
        resp = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=3, temperature=0)
        assert resp.choices[0].message.content and resp.usage.completion_tokens <= 3
        r = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=TIMEOUT)  # the key came from TUNESMITH_API_KEY
        assert r.status_code == 401
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert f"serving smol on http://127.0.0.1:{port}/v1 (API key required)" in text
