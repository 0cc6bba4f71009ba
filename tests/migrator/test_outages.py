"""Passes under injected faults (in-memory registry, real SQLite job database): a registry that
goes away mid-pass, one that commits a version and loses its reply, one that registered a
version twice, a job database that goes away after the work, a batch claimed by a process
that died."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from db import (
    AdapterOrigin,
    JobStatus,
    Lineage,
    approve,
    claim,
    duplicate_events,
    find_adapter_version,
    get_job,
    list_jobs,
    migrations,
    session_scope,
    start,
    utcnow,
)
from migrator.database import ensure_sqlite_parent, health_counts
from migrator.pipeline import Context, run_once
from migrator.pipeline.executor import OutcomeStatus
from migrator.registry import ModelVersionInfo, RegistryUnavailableError, RunInfo, Tag, VersionRef
from migrator.registry.memory import MemoryRegistry
from migrator.settings import load_settings
from migrator.wiring import build_context
from tests.migrator.scenario import Story

LINEAGES = ("enc-styleA", "enc-plainB", "enc-kohyaC")


class OutageRegistry(MemoryRegistry):
    """Goes down at the first call whose name starts with ``down_on``, and stays down (every
    call fails) until :meth:`back`."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.down_on: str | None = None
        self.down = False
        self.calls_while_down = 0

    def _enter(self, what: str) -> None:
        if self.down_on is not None and what.startswith(self.down_on):
            self.down = True
        if self.down:
            self.calls_while_down += 1
            raise RegistryUnavailableError(f"{what}: registry unreachable (simulated)")
        super()._enter(what)

    def back(self) -> None:
        self.down_on, self.down = None, False


class DoublingRegistry(MemoryRegistry):
    """Commits every create twice and answers with the second: what a client that re-sent a
    POST whose reply timed out got before the fix."""

    def create_version(
        self,
        *,
        name: str,
        run: RunInfo,
        artifact_path: str,
        tags: Mapping[str, str],
        description: str,
    ) -> ModelVersionInfo:
        super().create_version(
            name=name, run=run, artifact_path=artifact_path, tags=tags, description=description
        )
        src = Path(str(self.runs[run.run_id]["dir"])) / artifact_path
        return self.add_version(name, src, tags, description)


def _context(tmp_path: Path, registry: MemoryRegistry, **settings: Any) -> Context:
    s = load_settings(
        data_dir=tmp_path / "data",
        tracking_uri="sqlite:///unused.db",
        similarity_rank=8,
        heartbeat_s=5,
        retry_backoff_s=0,
        **settings,
    )
    url = s.database_url.get_secret_value()
    ensure_sqlite_parent(url)
    migrations.upgrade(url)
    return build_context(s, registry)


def _jobs(ctx: Context) -> dict[str, tuple[JobStatus, int, str | None]]:
    with session_scope(ctx.sessions) as session:
        return {
            j.adapter_version.name: (j.status, j.attempts, j.result_ref)
            for j in list_jobs(session=session)
            if j.target_base.ref == "enc/2"
        }


def _transferred(registry: MemoryRegistry) -> dict[str, list[str]]:
    """Lineage -> its transferred versions (those not marked duplicates)."""
    out: dict[str, list[str]] = {}
    for v in registry.versions.values():
        if Tag.JOB in v.tags and Tag.DUPLICATE_OF not in v.tags:
            out.setdefault(v.name, []).append(str(v.ref))
    return out


def _story(ctx: Context, registry: MemoryRegistry, tmp_path: Path) -> Story:
    story = Story(tmp_path / "story", registry)
    story.register_v1_with_adapters()
    story.register_successors()
    return story


@pytest.mark.parametrize("batch", [1, 4])
def test_a_registry_down_longer_than_all_retries_fails_nothing(tmp_path: Path, batch: int) -> None:
    registry = OutageRegistry(tmp_path / "registry")
    ctx = _context(tmp_path, registry, claim_batch=batch, auto_approve_atc=0.0)
    _story(ctx, registry, tmp_path)
    run_once(ctx)  # planned, waiting for an admin
    with session_scope(ctx.sessions) as session:
        for job in list_jobs(session=session, statuses=[JobStatus.PENDING_APPROVAL]):
            if job.target_base.ref == "enc/2":
                approve(job.id, "alice", "checked", session=session)
    before = _jobs(ctx)
    assert {s for s, _, _ in before.values()} == {JobStatus.APPROVED}

    registry.down_on = "download enc-"  # the first job's adapter download: mid-pass
    report = run_once(ctx)
    assert report.unavailable is not None and "registry unreachable" in report.unavailable
    assert "ended early: registry unreachable" in str(report)
    assert registry.calls_while_down == 1  # the breaker stopped the pass at the first sign
    assert _jobs(ctx) == before  # nothing changed state, nothing spent an attempt
    # The job in hand given back unspent, the rest of its batch released unstarted.
    statuses = [o.status for o in report.outcomes]
    assert statuses == [OutcomeStatus.DEFERRED] + [OutcomeStatus.RELEASED] * (min(batch, 3) - 1)
    assert _transferred(registry) == {}

    registry.back()
    again = run_once(ctx)
    assert again.unavailable is None
    jobs = _jobs(ctx)
    assert {name: (s, a) for name, (s, a, _) in jobs.items()} == {
        name: (JobStatus.SUCCEEDED, 1) for name in LINEAGES
    }
    assert {k: len(v) for k, v in _transferred(registry).items()} == dict.fromkeys(LINEAGES, 1)


def test_a_lost_reply_ends_the_pass_and_the_next_one_finds_the_version(tmp_path: Path) -> None:
    registry = MemoryRegistry(tmp_path / "registry")
    ctx = _context(tmp_path, registry, claim_batch=4)
    _story(ctx, registry, tmp_path)
    registry.drop_replies = 1  # the first create commits; its reply never comes
    first = run_once(ctx)
    assert first.unavailable is not None
    committed = _transferred(registry)
    assert sum(len(v) for v in committed.values()) == 1  # committed, unknown to the job
    assert {a for _, a, _ in _jobs(ctx).values()} == {0}

    second = run_once(ctx)
    assert second.unavailable is None and second.duplicates == []
    jobs = _jobs(ctx)
    assert {s for s, _, _ in jobs.values()} == {JobStatus.SUCCEEDED}
    versions = _transferred(registry)
    assert {k: len(v) for k, v in versions.items()} == dict.fromkeys(LINEAGES, 1)
    for name, (_, attempts, result) in jobs.items():
        assert versions[name] == [result] and attempts == 1
    (lineage,) = committed
    assert jobs[lineage][2] == committed[lineage][0]  # the committed version, found again


def test_the_reconciler_keeps_the_first_of_a_doubled_version(tmp_path: Path) -> None:
    registry = DoublingRegistry(tmp_path / "registry")
    ctx = _context(tmp_path, registry)
    _story(ctx, registry, tmp_path)
    run_once(ctx)
    jobs = _jobs(ctx)
    doubled = {
        name: sorted(
            str(v.ref) for v in registry.versions.values() if v.name == name and Tag.JOB in v.tags
        )
        for name in LINEAGES
    }
    assert all(len(v) == 2 for v in doubled.values()), doubled  # the fault did double them
    assert all(jobs[name][2] == doubled[name][1] for name in LINEAGES)  # recorded: the second

    report = run_once(ctx)
    assert sorted(report.duplicates) == sorted((v[1], v[0]) for v in doubled.values())
    for name, (kept, dup) in doubled.items():
        assert registry.versions[_ref(dup)].tags[Tag.DUPLICATE_OF] == kept
        assert Tag.DUPLICATE_OF not in registry.versions[_ref(kept)].tags
        status, _, result = _jobs(ctx)[name]
        assert (status, result) == (JobStatus.SUCCEEDED, kept)  # the job points at the first
    with session_scope(ctx.sessions) as session:
        events = duplicate_events(session=session)
        assert sorted(f"{e.name}/{e.version}" for e in events) == sorted(
            v[1] for v in doubled.values()
        )
        assert all(e.kept_version and e.job_id and e.actor for e in events)
        for kept, dup in doubled.values():
            kept_row = find_adapter_version(*kept.split("/"), session=session)
            assert kept_row is not None and kept_row.origin is AdapterOrigin.TRANSFERRED
            assert find_adapter_version(*dup.split("/"), session=session) is None
            edges = session.query(Lineage).filter(Lineage.child_id == kept_row.id).all()
            assert len(edges) == 1
    assert health_counts(ctx.settings.database_url.get_secret_value())["duplicates_marked"] == 3
    third = run_once(ctx)
    assert third.duplicates == [] and third.planned == []  # resolved once; nothing replanned


def _ref(text: str) -> VersionRef:
    return VersionRef.parse(text)


def test_a_second_job_database_reuses_the_version_already_on_the_target(tmp_path: Path) -> None:
    """Two deployments on one registry planned the same transfers; the second to run finds the
    first one's versions (other job ids: only the lineage, source and target match)."""
    registry = MemoryRegistry(tmp_path / "registry")
    first = _context(tmp_path / "one", registry)
    second = _context(tmp_path / "two", registry)
    _story(first, registry, tmp_path)
    run_once(first, execute=False)
    run_once(second, execute=False)  # both planned before either transferred anything
    run_once(first)
    before = _transferred(registry)
    assert {k: len(v) for k, v in before.items()} == dict.fromkeys(LINEAGES, 1)
    for refs in before.values():  # made by jobs the second database does not have
        registry.set_tags(_ref(refs[0]), {Tag.JOB: "999"})
    report = run_once(second)
    assert _transferred(registry) == before  # nothing transferred twice
    assert report.duplicates == []
    assert {o.status for o in report.outcomes} == {OutcomeStatus.SUCCEEDED}
    for name, (status, _, result) in _jobs(second).items():
        assert status is JobStatus.SUCCEEDED and [result] == before[name]


def test_a_database_outage_after_the_work_gives_the_job_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import migrator.pipeline.execution as execution

    registry = MemoryRegistry(tmp_path / "registry")
    ctx = _context(tmp_path, registry, claim_batch=1)
    _story(ctx, registry, tmp_path)
    away = OperationalError("UPDATE transfer_jobs", {}, Exception("server closed the connection"))

    def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise away

    monkeypatch.setattr(execution, "complete", unreachable)  # recording the success fails
    monkeypatch.setattr(execution, "release", unreachable)  # and so does giving it back
    report = run_once(ctx)
    assert report.unavailable is not None and "job database unreachable" in report.unavailable
    assert [o.status for o in report.outcomes] == [OutcomeStatus.DEFERRED]
    job_id = report.outcomes[0].job_id
    monkeypatch.undo()

    again = run_once(ctx)  # gives the job back, then runs every job
    assert again.unavailable is None
    assert (job_id, OutcomeStatus.RELEASED) in [(o.job_id, o.status) for o in again.outcomes]
    jobs = _jobs(ctx)
    assert {s for s, _, _ in jobs.values()} == {JobStatus.SUCCEEDED}
    with session_scope(ctx.sessions) as session:
        assert get_job(job_id, session=session).attempts == 1  # the outage cost nothing
    assert {k: len(v) for k, v in _transferred(registry).items()} == dict.fromkeys(LINEAGES, 1)


def test_a_job_that_fails_for_good_is_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = MemoryRegistry(tmp_path / "registry")
    ctx = _context(tmp_path, registry, max_attempts=1)
    _story(ctx, registry, tmp_path)
    run_once(ctx, execute=False)
    s = ctx.settings
    long_ago = utcnow() - timedelta(hours=1)
    with session_scope(ctx.sessions) as session:  # a worker started one job and died
        job = claim("dead-worker", limit=1, lease_seconds=60, now=long_ago, session=session)[0]
        start(job.id, "dead-worker", now=long_ago, session=session)
        dead = job.id
    with caplog.at_level("ERROR"):
        report = run_once(ctx)
    failed = [o for o in report.outcomes if o.status is OutcomeStatus.FAILED]
    assert [o.job_id for o in failed] == [dead]
    assert f"job {dead} failed for good" in caplog.text
    counts = health_counts(s.database_url.get_secret_value())
    assert counts["failed_jobs"] == 1 and counts["jobs"]["succeeded"] == 2
