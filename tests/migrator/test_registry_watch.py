"""What the watcher asks of a registry beyond a full listing (versions changed since a time,
versions of named registered models, tag filters, registered models by name), against the
in-memory fake and a real MLflow store; the probes that answer without loading MLflow agree
with MLflow's own client, on the SQLite store and on a running ``mlflow server``."""

from __future__ import annotations

import time
from pathlib import Path

from migrator.registry import Registry, Tag, VersionRef, VersionStamp
from migrator.registry.memory import MemoryRegistry
from migrator.registry.mlflow_probe import DatabaseProbe, RestProbe, probe_for
from migrator.registry.mlflow_registry import MlflowRegistry
from tests.fixtures.mlflow import MlflowServer, MlflowStore
from tests.migrator.scenario import register


def _files(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "weights.safetensors").write_text(name)
    return folder


def _after(registry: Registry) -> int:
    """A registry time later than every update so far (waits out the clock's millisecond)."""
    newest = max(s.updated_ms for s in registry.changed_since(0))
    time.sleep(0.01)
    return newest + 1


def test_changed_since_shows_creations_and_descriptions_not_tags(
    registry: Registry, tmp_path: Path
) -> None:
    base = register(registry, "base", _files(tmp_path, "b"), {Tag.ROLE: "base"})
    tags = {Tag.ROLE: "adapter", Tag.BASE: str(base)}
    one = register(registry, "style", _files(tmp_path, "a1"), tags)
    two = register(registry, "style", _files(tmp_path, "a2"), tags)
    everything = registry.changed_since(0)
    assert {s.ref for s in everything} == {base, one, two}
    times = [s.updated_ms for s in everything]
    assert times == sorted(times, reverse=True) and times[0] > 0  # newest first

    since = _after(registry)
    assert registry.changed_since(since) == []
    registry.set_tags(one, {Tag.BASE: "base/9"})  # MLflow moves no update time for a tag
    assert registry.get_version(one).tags[Tag.BASE] == "base/9"
    assert registry.changed_since(since) == []
    assert isinstance(registry, MemoryRegistry | MlflowRegistry)
    registry.set_version_description(two, "described")  # a description moves it
    (moved,) = registry.changed_since(since)
    assert moved.ref == two and moved.updated_ms >= since
    three = register(registry, "style", _files(tmp_path, "a3"), tags)
    assert [s.ref for s in registry.changed_since(since)] == [three, two]


def test_versions_of_named_models_and_tag_filters(registry: Registry, tmp_path: Path) -> None:
    base = register(registry, "base", _files(tmp_path, "b"), {Tag.ROLE: "base"})
    other = register(registry, "other-base", _files(tmp_path, "o"), {Tag.ROLE: "base"})
    on_base = {Tag.ROLE: "adapter", Tag.BASE: str(base)}
    a1 = register(registry, "style", _files(tmp_path, "a1"), on_base)
    a2 = register(registry, "style", _files(tmp_path, "a2"), {**on_base, Tag.BASE: str(other)})
    b1 = register(registry, "plain", _files(tmp_path, "p1"), on_base)
    register(registry, "vision", _files(tmp_path, "v1"), {"team": "vision"})  # not ours

    found = registry.list_model_versions(["style", "absent"], role="adapter")
    assert sorted(v.ref for v in found) == [a1, a2]
    assert {v.ref for v in registry.list_model_versions(["style", "plain", "vision"])} == {
        a1,
        a2,
        b1,
        VersionRef("vision", "1"),
    }
    assert registry.list_model_versions([], role="adapter") == []
    on = registry.list_versions(role="adapter", tags={Tag.BASE: str(base)})
    assert sorted(v.ref for v in on) == [b1, a1]
    assert registry.list_versions(tags={"team": "vision"})[0].ref == VersionRef("vision", "1")

    assert isinstance(registry, MemoryRegistry | MlflowRegistry)
    models = registry.find_models(["style", "absent", "base"])
    assert sorted(m.name for m in models) == ["base", "style"]


def test_the_database_probe_says_what_mlflow_says(
    mlflow_store: MlflowStore, tmp_path: Path
) -> None:
    registry = MlflowRegistry(mlflow_store.uri, artifact_root=mlflow_store.artifact_root, retries=0)
    assert isinstance(registry._probe, DatabaseProbe)
    base = register(registry, "base", _files(tmp_path, "b"), {Tag.ROLE: "base"})
    refs = [
        register(registry, "style", _files(tmp_path, f"a{i}"), {Tag.ROLE: "adapter"})
        for i in range(3)
    ]
    registry.client.delete_model_version("style", refs[1].version)  # gone from the search

    def by_client(since: int) -> list[VersionStamp]:
        return registry._changed_pages(since)

    probed = registry._probe(0)
    assert {s.ref for s in probed} == {base, refs[0], refs[2]}
    assert probed == by_client(0)
    middle = sorted(s.updated_ms for s in probed)[1]
    assert registry._probe(middle) == by_client(middle) != probed
    registry._probe = None  # without a probe the client answers the same
    assert registry.changed_since(0) == probed


def test_the_rest_probe_says_what_the_server_says(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    registry = MlflowRegistry(mlflow_server.url, retries=0)
    probe = probe_for(mlflow_server.url)
    assert isinstance(probe, RestProbe)
    probe.page_size = 2  # several pages
    name = f"watch-{time.time_ns()}"
    refs = [
        register(registry, name, _files(tmp_path, f"a{i}"), {Tag.ROLE: "adapter"}) for i in range(5)
    ]
    since = min(registry.get_version(r).updated_ms for r in refs)
    probed = probe(since)
    assert {s.ref for s in probed} >= set(refs)  # other tests' versions on the server may be newer
    assert probed == registry._changed_pages(since)
    assert [s.ref for s in probed if s.name == name] == refs[::-1]
