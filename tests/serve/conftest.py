"""Shared fixtures for the serve / web tests: an API server on a free loopback port (over the SmolLM2 engine of
tests/conftest.py)."""

from __future__ import annotations

import socket
import threading

import pytest

from tests.timeouts import TIMEOUT, wait_for

API_KEY = "sk-test-tunesmith"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def api_server(smollm2_engine):
    """(base_url, engine): `tunesmith serve`'s app under uvicorn in a thread on 127.0.0.1, with API_KEY."""
    pytest.importorskip("fastapi", reason="pip install 'tunesmith[serve]'")
    uvicorn = pytest.importorskip("uvicorn", reason="pip install 'tunesmith[serve]'")
    from tunesmith.serve.api import create_app

    app = create_app(smollm2_engine, model_name="smollm2-135m-instruct", api_key=API_KEY)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), "the API server starting")
    if not server.started:
        pytest.fail("the API server did not start")
    yield f"http://127.0.0.1:{port}", smollm2_engine
    server.should_exit = True
    thread.join(timeout=TIMEOUT)
