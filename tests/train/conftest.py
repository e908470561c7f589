"""Fixtures for the training tests: a tiny Llama folder and a small conversation dataset (built once)."""

from __future__ import annotations

import json
import random

import pytest

from tunesmith.config import TrainConfig

WORDS = ("the model learns to answer questions about data and code with care while users ask for help on "
         "training tokens loss gradient adapter merge chat hello world please tell me five scenic spots").split()


@pytest.fixture(scope="session")
def train_model_dir(tmp_path_factory):
    from tests.fixtures.tiny_models import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama_train"))


@pytest.fixture(scope="session")
def train_data_file(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("train_data") / "conv.jsonl"
    rows = []
    for i in range(40):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
        a = "answer " + " ".join(WORDS[(i + k) % 7] for k in range(rng.randint(2, 6)))  # learnable pattern
        rows.append({"conversation": [{"input": q, "output": a}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_config(model_dir, data_file, cache_dir, **sections) -> TrainConfig:
    """A config that trains the tiny model in seconds (fp32, CPU, deterministic)."""
    base = {
        "method": "lora",
        "model": {"path": str(model_dir), "dtype": "fp32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"path": str(data_file), "format": "conversation", "prompt_template": "auto", "max_length": 64,
                 "cache_dir": str(cache_dir)},
        "training": {"max_epochs": 2, "batch_size": 2, "accumulative_counts": 2, "lr": 3e-3, "warmup_ratio": 0.1,
                     "gradient_checkpointing": False, "deterministic": True, "log_interval": 1,
                     "save_total_limit": 2},
        "evaluation": {"inputs": ["hello world"], "every_n_steps": 4, "max_new_tokens": 6, "temperature": 0.0},
        "logging": {"tensorboard": True, "plot": True},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            base.setdefault(name, {}).update(values)
        else:
            base[name] = values
    return TrainConfig.model_validate(base)


@pytest.fixture
def make_cfg(train_model_dir, train_data_file, tmp_path):
    def make(**sections):
        return tiny_config(train_model_dir, train_data_file, tmp_path / "cache", **sections)

    return make
