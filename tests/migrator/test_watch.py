"""The watcher: a pass reads only what changed since the last one (the cursor and the webhook
marks in the job database), writes only the pages a change reaches, reads everything every
``full_reconcile_every`` passes (a tag set without a delivery, a deleted version), and an idle
``migrator tick`` loads no tensor library. Against the in-memory fake and a real MLflow store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from db import (
    AdapterVersion,
    get_cursor,
    list_jobs,
    mark_version,
    marked_versions,
    migrations,
    session_scope,
)
from migrator.database import ensure_sqlite_parent
from migrator.pipeline import Context, TickReport, run_once
from migrator.pipeline.watch import OVERLAP_MS, registry_key
from migrator.registry import Registry, Tag, VersionRef
from migrator.registry.memory import MemoryRegistry
from migrator.registry.mlflow_registry import MlflowRegistry
from migrator.settings import load_settings
from migrator.wiring import build_context
from tests.fixtures.mlflow import MlflowStore
from tests.migrator.scenario import Story, register

REPOSITORY = Path(__file__).resolve().parents[2]


def _ctx(tmp_path: Path, registry: Registry, every: int = 100) -> Context:
    settings = load_settings(
        data_dir=tmp_path / "data",
        tracking_uri="sqlite:///unused.db",
        similarity_rank=8,
        heartbeat_s=5,
        full_reconcile_every=every,
    )
    ensure_sqlite_parent(settings.database_url.get_secret_value())
    migrations.upgrade(settings.database_url.get_secret_value())
    return build_context(settings, registry)


def _recorded(ctx: Context) -> set[VersionRef]:
    with session_scope(ctx.sessions) as session:
        return {VersionRef(a.name, a.version) for a in session.query(AdapterVersion)}


def _settle(ctx: Context) -> list[str]:
    """Passes until one reads nothing (the pages written by a pass move update times, so the
    next one reads those lineages again, writing nothing)."""
    listings = []
    for _ in range(4):
        report = run_once(ctx)
        assert report.problems == []
        listings.append(report.listing)
        if report.listing == "none":
            return listings
    raise AssertionError(f"the passes never settled: {listings}")


def _story(tmp_path: Path, registry: Registry) -> Story:
    story = Story(tmp_path / "story", registry)
    story.register_v1_with_adapters()
    return story


def _adapter_tags(story: Story) -> dict[str, str]:
    return {Tag.ROLE: "adapter", Tag.BASE: str(story.refs["v1"]), Tag.FORMAT: "lorax"}


def _files(story: Story) -> Path:
    return story.root / "adapters" / "styleA"


def _shown(ref: VersionRef, page: str) -> bool:
    """Whether a version page links ``ref`` (as the lineage sections write it)."""
    return f"[{ref.name} v{ref.version}]" in page


def _delete(registry: Registry, ref: VersionRef) -> None:
    if isinstance(registry, MemoryRegistry):
        registry.delete_version(ref)
    else:
        assert isinstance(registry, MlflowRegistry)
        registry.client.delete_model_version(ref.name, ref.version)


def test_a_pass_reads_only_what_changed(registry: Registry, tmp_path: Path) -> None:
    story = _story(tmp_path, registry)
    ctx = _ctx(tmp_path, registry)
    listings = _settle(ctx)
    assert listings[0] == "full" and listings[-1] == "none"
    assert _recorded(ctx) == {story.refs[n] for n in ("styleA", "plainB", "kohyaC")}
    if isinstance(registry, MemoryRegistry):
        registry.calls.clear()
        assert run_once(ctx).listing == "none"
        assert registry.calls == ["changed_since"]  # one question, nothing else

    new = register(registry, "enc-styleA", _files(story), _adapter_tags(story))
    report = run_once(ctx)
    assert report.listing == "changes" and report.planned == [] and report.problems == []
    assert new in _recorded(ctx) and report.adapters == 4
    assert _settle(ctx)[-1] == "none"


def test_a_pass_writes_only_the_pages_a_change_reaches(tmp_path: Path) -> None:
    registry = MemoryRegistry(tmp_path / "registry")
    story = _story(tmp_path, registry)
    story.register_successors()
    ctx = _ctx(tmp_path, registry)
    first = run_once(ctx)
    assert len(first.planned) == 6 and first.problems == []
    _settle(ctx)
    registry.calls.clear()
    new = register(registry, "enc-newD", _files(story), _adapter_tags(story))  # on enc/1
    report = run_once(ctx)
    assert report.listing == "changes" and report.problems == []
    assert sorted(p.target_base for p in report.planned) == ["enc-other/1", "enc/2"]
    assert {p.adapter for p in report.planned} == {str(new)}
    described = [c for c in registry.calls if c.startswith("describe")]
    assert f"describe {new}" in described and "describe enc/1" in described
    assert not any("plainB" in c or "kohyaC" in c for c in described)  # untouched lineages
    assert _shown(new, registry.get_version(story.refs["v1"]).description)


def test_a_retag_reaches_the_next_pass_through_a_webhook_mark(
    registry: Registry, tmp_path: Path
) -> None:
    story = _story(tmp_path, registry)
    foreign = register(registry, "vision-x", _files(story), {"team": "vision"})
    ctx = _ctx(tmp_path, registry)
    _settle(ctx)
    registry.set_tags(foreign, _adapter_tags(story))  # a tag moves no update time
    assert run_once(ctx).listing == "none"
    assert foreign not in _recorded(ctx)

    with session_scope(ctx.sessions) as session:  # what the receiver records on delivery
        mark_version(foreign.name, foreign.version, "model_version_tag.set", session=session)
    report = run_once(ctx)
    assert report.listing == "changes" and report.problems == []
    assert foreign in _recorded(ctx)
    with session_scope(ctx.sessions) as session:
        assert marked_versions(session=session) == []  # handled
    assert _settle(ctx)[-1] == "none"


def test_the_full_reconcile_catches_an_unmarked_tag_and_a_deletion(
    registry: Registry, tmp_path: Path
) -> None:
    story = _story(tmp_path, registry)
    story.register_successors()
    foreign = register(registry, "vision-x", _files(story), {"team": "vision"})
    ctx = _ctx(tmp_path, registry, every=4)
    listings = _settle(ctx)
    v1 = story.refs["v1"]
    assert _shown(story.refs["plainB"], registry.get_version(v1).description)

    registry.set_tags(foreign, _adapter_tags(story))  # no delivery
    _delete(registry, story.refs["plainB"])
    reports: list[TickReport] = []
    while len(listings) + len(reports) < 4:
        reports.append(run_once(ctx))
        assert reports[-1].listing == "none"
        assert foreign not in _recorded(ctx)
        assert _shown(story.refs["plainB"], registry.get_version(v1).description)
    full = run_once(ctx)  # the 4th pass since the last full one
    assert full.listing == "full" and full.problems == []
    assert foreign in _recorded(ctx)
    page = registry.get_version(v1).description
    assert not _shown(story.refs["plainB"], page) and _shown(foreign, page)
    assert run_once(ctx).listing in ("changes", "none")  # the count restarts


def test_every_pass_reads_everything_when_told(tmp_path: Path) -> None:
    registry = MemoryRegistry(tmp_path / "registry")
    _story(tmp_path, registry)
    ctx = _ctx(tmp_path, registry, every=1)
    assert [run_once(ctx).listing for _ in range(3)] == ["full"] * 3


def test_a_late_commit_inside_the_window_is_caught_once(tmp_path: Path) -> None:
    registry = MemoryRegistry(tmp_path / "registry")
    story = _story(tmp_path, registry)
    ctx = _ctx(tmp_path, registry)
    _settle(ctx)
    with session_scope(ctx.sessions) as session:
        cursor = get_cursor(registry_key(registry), session=session)
        assert cursor is not None
        listed_ms = cursor.listed_ms
    tags = _adapter_tags(story)

    def backdated(name: str, ms: int) -> VersionRef:
        info = registry.add_version(name, _files(story), tags)
        registry.versions[info.ref] = replace(info, created_ms=ms, updated_ms=ms)
        return info.ref

    late = backdated("enc-late", listed_ms - OVERLAP_MS // 2)  # committed late, stamped early
    lost = backdated("enc-lost", listed_ms - 2 * OVERLAP_MS)  # beyond the window
    report = run_once(ctx)
    assert report.listing == "changes"
    assert late in _recorded(ctx) and lost not in _recorded(ctx)
    assert _settle(ctx)[-1] == "none"  # not read again

    story.register_successors()  # a new base: every lineage is read, the lost one too
    planned = run_once(ctx, execute=False)
    assert planned.listing == "full" and lost in _recorded(ctx)
    lineages = {p.adapter.split("/")[0] for p in planned.planned}
    assert {"enc-late", "enc-lost", "enc-styleA"} <= lineages
    again = run_once(ctx, execute=False)
    assert again.planned == []  # nothing planned twice
    with session_scope(ctx.sessions) as session:
        keys = [(j.adapter_version.name, j.target_base_id) for j in list_jobs(session=session)]
    assert len(keys) == len(set(keys)) == len(planned.planned)


def test_an_idle_tick_loads_no_tensor_library(mlflow_store: MlflowStore, tmp_path: Path) -> None:
    registry = MlflowRegistry(mlflow_store.uri, artifact_root=mlflow_store.artifact_root, retries=0)
    _story(tmp_path, registry)
    env = {
        "MIGRATOR_DATA_DIR": str(tmp_path / "data"),
        "MIGRATOR_TRACKING_URI": mlflow_store.uri,
        "MIGRATOR_ARTIFACT_ROOT": mlflow_store.artifact_root,
        "MIGRATOR_SIMILARITY_RANK": "8",
    }
    settings = load_settings(
        data_dir=tmp_path / "data", tracking_uri=mlflow_store.uri, similarity_rank=8
    )
    ensure_sqlite_parent(settings.database_url.get_secret_value())
    migrations.upgrade(settings.database_url.get_secret_value())
    _settle(build_context(settings, registry))
    code = (
        "import json, sys\n"
        "from migrator.cli import app\n"
        "try:\n"
        "    app(['tick', '--json'])\n"
        "except SystemExit as end:\n"
        "    assert not end.code, end.code\n"
        "heavy = ('torch', 'ot', 'mlflow', 'transformers', 'diffusers', 'peft', 'safetensors')\n"
        "print(json.dumps([m for m in heavy if m in sys.modules]), file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPOSITORY,
        env={**os.environ, **env, "PYTHONPATH": str(REPOSITORY)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["jobs"] == []
    assert json.loads(done.stderr.strip().splitlines()[-1]) == []
