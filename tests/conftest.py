"""Suite-wide settings. Shared fixtures live in ``tests/fixtures/`` and are registered here."""

from __future__ import annotations

import os

# Before anything imports mlflow or transformers: no telemetry, no hub access.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

pytest_plugins = [
    "tests.fixtures.models",
    "tests.fixtures.sdxl",
    "tests.fixtures.postgres",
    "tests.fixtures.mlflow",
    "tests.fixtures.browser",
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
