"""Registration under a registry that commits and then loses its reply (an in-process fake in
front of a real embedded MLflow store), and a download cut short by a dying server."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

from migrator.registry import RegistryUnavailableError, RunInfo, Tag, VersionRef
from migrator.registry.mlflow_registry import MlflowRegistry
from tests.fixtures.mlflow import MlflowStore

IDENTITY = {Tag.TRANSFERRED_FROM: "style/1", Tag.BASE: "enc/2"}


class ReplyLosingClient:
    """An ``MlflowClient`` whose ``create_model_version`` commits, then raises what a timed-out
    reply raises (``lost`` times); everything else goes to the real client."""

    def __init__(self, client: Any, lost: int = 1) -> None:
        self._client = client
        self.lost = lost
        self.creates = 0

    def create_model_version(self, *args: Any, **kwargs: Any) -> Any:
        self.creates += 1
        version = self._client.create_model_version(*args, **kwargs)
        if self.lost > 0:
            self.lost -= 1
            raise MlflowException(
                "API request to http://127.0.0.1:5000/api/2.0/mlflow/model-versions/create "
                "failed with timeout exception HTTPConnectionPool(host='127.0.0.1', port=5000): "
                "Read timed out. (read timeout=30)."
            )
        return version

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


@dataclass
class Store:
    registry: MlflowRegistry
    run: RunInfo


@pytest.fixture
def store(mlflow_store: MlflowStore, tmp_path: Path) -> Store:
    """A real embedded store with adapter ``style/1`` and the run of a transfer of it."""
    registry = MlflowRegistry(
        mlflow_store.uri, artifact_root=mlflow_store.artifact_root, retries=2, backoff_s=0
    )
    files = tmp_path / "files"
    files.mkdir()
    (files / "adapter.safetensors").write_text("transferred")
    run = registry.log_run(
        experiment="migrations",
        run_name="style/1 -> enc/2",
        job_key="7",
        params={},
        metrics={},
        tags=IDENTITY,
        artifacts={"adapter": files},
    )
    with contextlib.suppress(Exception):
        registry.client.create_registered_model("style")
    registry.client.create_model_version("style", "file:///nowhere", tags={Tag.ROLE: "adapter"})
    return Store(registry, run)


def _create(store: Store, identity: dict[str, str] = IDENTITY) -> VersionRef:
    return store.registry.create_version(
        name="style",
        run=store.run,
        artifact_path="adapter",
        tags={Tag.ROLE: "adapter", Tag.JOB: "7", **identity},
        description="",
    ).ref


def _versions(registry: MlflowRegistry) -> list[str]:
    return sorted(v.version for v in registry.find_versions("style", {}))


def test_a_create_whose_reply_is_lost_is_found_not_repeated(store: Store) -> None:
    registry = store.registry
    proxy = ReplyLosingClient(registry.client)
    registry.client = proxy  # type: ignore[assignment]
    assert _versions(registry) == ["1"]
    ref = _create(store)
    assert proxy.creates == 1  # the retry looked first and found the committed version
    assert ref == VersionRef("style", "2")
    assert _versions(registry) == ["1", "2"]
    assert _create(store) == ref  # and a later run of the job finds it too
    assert proxy.creates == 1


def test_the_same_job_id_of_another_transfer_is_not_taken_for_this_one(store: Store) -> None:
    """Job ids repeat across job databases: only the same transfer (source and target) is the
    same version."""
    first = _create(store)
    other = _create(store, {Tag.TRANSFERRED_FROM: "style/1", Tag.BASE: "x/1"})
    assert other != first and _versions(store.registry) == ["1", "2", "3"]


def test_mlflow_never_resends_a_request_itself(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")  # whatever the environment says
    MlflowRegistry(store.registry.tracking_uri)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"


def test_a_download_cut_short_by_a_dead_server_is_an_outage(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow reports a transfer cut short as missing artifacts ("please ensure that the path
    is correct"); the version exists, the registry is gone: say so."""
    import mlflow.artifacts

    registry = store.registry
    ref = _create(store)

    def cut_short(**kwargs: Any) -> str:
        raise MlflowException(
            "Failed to download artifacts from path 'adapter', please ensure that the path is "
            "correct.",
            error_code=RESOURCE_DOES_NOT_EXIST,
        )

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", cut_short)
    real_get = registry.client.get_model_version

    def server_gone(name: str, version: str) -> Any:
        raise ConnectionError("Connection refused")

    monkeypatch.setattr(
        registry.client, "get_model_version_download_uri", lambda n, v: "runs:/x/adapter"
    )
    monkeypatch.setattr(registry.client, "get_model_version", server_gone)
    with pytest.raises(RegistryUnavailableError, match="registry unreachable") as raised:
        registry.download(ref, tmp_path / "dl")
    assert "ensure that the path" not in str(raised.value).split("(")[0]

    monkeypatch.setattr(registry.client, "get_model_version", real_get)  # reachable: missing
    with pytest.raises(Exception, match="ensure that the path is correct") as missing:
        registry.download(ref, tmp_path / "dl2")
    assert not isinstance(missing.value, RegistryUnavailableError)
