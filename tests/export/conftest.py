"""Fixtures for the export tests: adapters and training checkpoints (docs/internals.md format) on tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.export.helpers import make_adapter


@pytest.fixture(scope="session")
def bases(tiny_llama, tiny_qwen2, tiny_internlm, tiny_internlm2):
    return {"llama": tiny_llama, "qwen2": tiny_qwen2, "internlm": tiny_internlm, "internlm2": tiny_internlm2}


@pytest.fixture(scope="session")
def adapter_factory(tmp_path_factory):
    """make(base_path, **make_adapter options) -> adapter folder, cached for the session."""
    cache: dict[tuple, Path] = {}

    def make(base: Path, **options) -> Path:
        key = (str(base), tuple(sorted((k, str(v)) for k, v in options.items())))
        if key not in cache:
            cache[key] = make_adapter(base, tmp_path_factory.mktemp("adapter"), **options)
        return cache[key]

    return make
