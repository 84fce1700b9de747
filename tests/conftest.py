"""Shared fixtures: a private model cache per test session, a tiny recipe writer, and the tiny model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    # Tiny models gain nothing from a second thread, and two OpenMP threads spin-waiting for a busy core
    # slow them down many times over; subprocesses (the distributed tests) inherit OMP_NUM_THREADS.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread in every test, whatever a library set before it: the tiny models' matrices are too small for
    a second thread to pay off, and on a shared, busy machine OpenMP threads spin waiting for each other's core
    (a 3 s test then takes over a minute)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from common.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_rows(n: int = 24) -> list[dict]:
    """A memorisable chat dataset: the same two answers over and over."""
    answers = {"colour of the sky": "blue", "colour of grass": "green"}
    items = list(answers.items())
    return [{"prompt": [{"role": "user", "content": f"What is the {q}?"}],
             "completion": [{"role": "assistant", "content": a}]}
            for q, a in (items[i % 2] for i in range(n))]


@pytest.fixture
def recipe_file(tmp_path):
    """Write a recipe (a dict) and its SFT data into tmp_path; return the recipe path."""

    def make(recipe: dict | None = None, rows: list[dict] | None = None) -> Path:
        write_jsonl(tmp_path / "sft.jsonl", rows if rows is not None else sft_rows())
        recipe = recipe or {
            "name": "t",
            "model": {"base": "tiny-random-llama", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
            "stages": {"sft": {"kind": "sft", "data": {"path": "sft.jsonl", "test_size": 0.25},
                               "args": {"max_steps": 4, "per_device_train_batch_size": 4, "logging_steps": 1,
                                        "learning_rate": 1e-3, "save_strategy": "no"}}},
        }
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return path

    return make
