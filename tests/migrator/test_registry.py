"""The same registry contract against the in-memory fake and the real MLflow store."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from migrator.registry import (
    Registry,
    RegistryUnavailableError,
    Tag,
    VersionNotFoundError,
    VersionRef,
)
from migrator.registry.memory import MemoryRegistry
from migrator.registry.mlflow_registry import MlflowRegistry, is_transient
from migrator.registry.retry import retry_call


def _register(registry: Registry, name: str, files: Path, tags: dict[str, str]) -> VersionRef:
    """Register a version the way a user would, through a run."""
    if isinstance(registry, MemoryRegistry):
        return registry.add_version(name, files, tags).ref
    assert isinstance(registry, MlflowRegistry)
    run = registry.log_run(
        experiment="uploads",
        run_name=f"upload {name}",
        job_key=f"upload-{name}-{files.name}",
        params={},
        metrics={},
        tags={},
        artifacts={"files": files},
    )
    with contextlib.suppress(Exception):
        registry.client.create_registered_model(name)
    return registry.create_version(
        name=name, run=run, artifact_path="files", tags=tags, description=""
    ).ref


def _files(tmp_path: Path, name: str, content: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "weights.safetensors").write_text(content)
    return folder


def test_roles_tags_and_download(registry: Registry, tmp_path: Path) -> None:
    base = _register(registry, "base", _files(tmp_path, "b1", "base-1"), {Tag.ROLE: "base"})
    adapter = _register(
        registry,
        "style",
        _files(tmp_path, "a1", "adapter-1"),
        {Tag.ROLE: "adapter", Tag.BASE: str(base)},
    )
    assert [v.ref for v in registry.list_versions(role="base")] == [base]
    assert [v.ref for v in registry.list_versions(role="adapter")] == [adapter]
    assert registry.get_version(adapter).tags[Tag.BASE] == "base/1"

    registry.set_tags(base, {Tag.DEPRECATED: "true"})
    assert registry.get_version(base).tags[Tag.DEPRECATED] == "true"
    assert registry.get_version(base).tags[Tag.ROLE] == "base"

    local = registry.download(adapter, tmp_path / "dl")
    found = list(local.rglob("weights.safetensors"))
    assert len(found) == 1 and found[0].read_text() == "adapter-1"

    with pytest.raises(VersionNotFoundError):
        registry.get_version(VersionRef("base", "99"))


def test_registration_is_idempotent_by_job_tag(registry: Registry, tmp_path: Path) -> None:
    _register(registry, "style", _files(tmp_path, "a1", "x"), {Tag.ROLE: "adapter"})
    out = _files(tmp_path, "out", "transferred")
    run = registry.log_run(
        experiment="migrations",
        run_name="migrate",
        job_key="42",
        params={"mode": "project"},
        metrics={"atc": 0.1},
        tags={},
        artifacts={"adapter": out},
    )
    assert (
        registry.log_run(
            experiment="migrations",
            run_name="migrate",
            job_key="42",
            params={},
            metrics={},
            tags={},
            artifacts={"adapter": out},
        )
        == run
    )
    tags = {Tag.ROLE: "adapter", Tag.JOB: "42"}
    first = registry.create_version(
        name="style", run=run, artifact_path="adapter", tags=tags, description="d"
    )
    again = registry.create_version(
        name="style", run=run, artifact_path="adapter", tags=tags, description="d"
    )
    assert first.ref == again.ref == VersionRef("style", "2")
    assert registry.find_version_by_tag("style", Tag.JOB, "42") is not None
    assert registry.find_version_by_tag("style", Tag.JOB, "43") is None
    assert len([v for v in registry.list_versions(role="adapter")]) == 2
    local = registry.download(first.ref, tmp_path / "dl2")
    assert [p.read_text() for p in local.rglob("weights.safetensors")] == ["transferred"]
    assert registry.version_link(first.ref).endswith("/models/style/versions/2")


def test_a_run_is_reused_only_for_the_same_transfer(registry: Registry, tmp_path: Path) -> None:
    """Job ids repeat across job databases that share a registry (found end to end: a second
    deployment's job 1 registered the first deployment's adapter files)."""

    def log(adapter: str, content: str) -> str:
        return registry.log_run(
            experiment="migrations",
            run_name=f"{adapter} -> enc/2",
            job_key="1",
            params={},
            metrics={},
            tags={Tag.TRANSFERRED_FROM: adapter, Tag.BASE: "enc/2"},
            artifacts={
                "adapter": _files(tmp_path, f"{adapter.replace('/', '-')}-{content}", content)
            },
        ).run_id

    first = log("styleA/1", "a")
    other = log("styleB/1", "b")  # another database's job 1
    assert other != first
    assert log("styleA/1", "again") == first  # the same transfer re-run: its run is reused


def test_version_refs_parse_and_refuse() -> None:
    assert VersionRef.parse("minilm/2") == VersionRef("minilm", "2")
    assert VersionRef.parse("models:/org/minilm/12") == VersionRef("org/minilm", "12")
    assert str(VersionRef("a", "1")) == "a/1"
    for bad in ("minilm", "minilm/", "/2", "minilm/latest"):
        with pytest.raises(ValueError, match="name/version"):
            VersionRef.parse(bad)


def test_transient_errors_are_retried_then_reported() -> None:
    calls: list[int] = []
    sleeps: list[float] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("Connection refused")
        return "ok"

    assert (
        retry_call(
            flaky,
            is_transient=is_transient,
            retries=3,
            backoff_s=0.5,
            what="x",
            sleep=sleeps.append,
        )
        == "ok"
    )
    assert sleeps == [0.5, 1.0]

    def down() -> None:
        raise ConnectionError("Connection refused")

    with pytest.raises(ConnectionError):
        retry_call(
            down, is_transient=is_transient, retries=2, backoff_s=0, what="x", sleep=lambda s: None
        )

    def permanent() -> None:
        calls.append(1)
        raise ValueError("bad input")

    calls.clear()
    with pytest.raises(ValueError):
        retry_call(permanent, is_transient=is_transient, retries=5, backoff_s=0, what="x")
    assert len(calls) == 1


def test_unreachable_server_is_a_registry_unavailable_error() -> None:
    from tests.fixtures.mlflow import free_port

    registry = MlflowRegistry(f"http://127.0.0.1:{free_port()}", retries=1, backoff_s=0.01)
    with pytest.raises(RegistryUnavailableError):
        registry.list_versions(role="base")
