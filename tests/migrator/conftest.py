"""Fixtures shared by the service tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from migrator.registry import Registry
from migrator.registry.memory import MemoryRegistry
from migrator.registry.mlflow_registry import MlflowRegistry
from tests.fixtures.mlflow import MlflowStore


@pytest.fixture(params=["memory", "mlflow"])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Registry:
    """Each test twice: on the in-memory registry and on a real embedded MLflow store."""
    if request.param == "memory":
        return MemoryRegistry(tmp_path / "registry")
    store: MlflowStore = request.getfixturevalue("mlflow_store")
    return MlflowRegistry(store.uri, artifact_root=store.artifact_root, retries=0)
