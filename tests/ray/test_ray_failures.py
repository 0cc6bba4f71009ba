"""Failures on Ray: a worker killed mid-transfer, retries exhausted, bad content, a lost lease.
Each job ends registered exactly once, or not at all (real MLflow store, local Ray, 2 CPUs)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from db import JobStatus, claim, get_job, list_jobs, migrations, session_scope
from migrator.database import ensure_sqlite_parent
from migrator.executors.ray_executor import RayExecutor
from migrator.pipeline import Context, run_once
from migrator.pipeline.context import CRASH_ENV
from migrator.registry import Tag
from migrator.registry.mlflow_registry import MlflowRegistry
from migrator.settings import load_settings
from migrator.wiring import build_context
from tests.ray.conftest import Fleet, make_fleet

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return make_fleet(tmp_path / "fleet", 2, broken=1)


@pytest.fixture
def ctx(ray_runtime: Any, new_store: Any, fleet: Fleet, tmp_path: Path) -> Iterator[Context]:
    store = new_store("mlflow")
    settings = load_settings(
        data_dir=tmp_path / "data",
        tracking_uri=store.uri,
        artifact_root=store.artifact_root,
        similarity_rank=8,
        executor="ray",
        heartbeat_s=1,
        retry_backoff_s=0,
    )
    ensure_sqlite_parent(settings.database_url.get_secret_value())
    migrations.upgrade(settings.database_url.get_secret_value())
    registry = MlflowRegistry(store.uri, artifact_root=store.artifact_root, retries=2)
    fleet.register(registry)
    yield build_context(settings, registry)


def _versions_per_job(ctx: Context) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for version in ctx.registry.list_versions(role="adapter"):
        if Tag.JOB in version.tags:
            out.setdefault(version.tags[Tag.JOB], []).append(str(version.ref))
    return out


def _jobs(ctx: Context) -> dict[str, tuple[int, JobStatus, int, str | None]]:
    with session_scope(ctx.sessions) as session:
        return {
            j.adapter_version.name: (j.id, j.status, j.attempts, j.last_error)
            for j in list_jobs(session=session)
        }


def _assert_each_good_job_registered_once(ctx: Context, fleet: Fleet) -> None:
    jobs, versions = _jobs(ctx), _versions_per_job(ctx)
    good = [name for name, _, _ in fleet.adapters if name not in fleet.broken]
    assert good
    for name in good:
        job_id, status, _, _ = jobs[name]
        assert status is JobStatus.SUCCEEDED, (name, jobs[name])
        assert len(versions[str(job_id)]) == 1, versions
    for name in fleet.broken:  # bad content: failed for good, nothing registered
        job_id, status, attempts, error = jobs[name]
        assert status is JobStatus.FAILED and attempts == 1
        assert error is not None and "CorruptFileError" in error
        assert str(job_id) not in versions
    assert sum(len(v) for v in versions.values()) == len(good)


@pytest.mark.parametrize("point", ["mid_transfer", "after_register"])
def test_worker_killed_inside_the_task_is_retried_by_ray_and_registers_once(
    ctx: Context, fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    marker = tmp_path / "crashes"
    monkeypatch.setenv(CRASH_ENV, f"{point}:1")  # forwarded to the tasks' environment
    monkeypatch.setenv("MIGRATOR_CRASH_MARKER", str(marker))
    report = run_once(ctx)

    assert marker.read_text() == "1"  # a worker process did die (os._exit) inside a task
    assert sorted(o.status for o in report.outcomes) == ["failed", "succeeded", "succeeded"]
    _assert_each_good_job_registered_once(ctx, fleet)
    # Ray's retry absorbed the crash: no job needed a second attempt of its own.
    good = [name for name, _, _ in fleet.adapters if name not in fleet.broken]
    assert {_jobs(ctx)[name][2] for name in good} == {1}


def test_when_ray_gives_up_the_job_is_retried_and_registers_once(
    ctx: Context, fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CRASH_ENV, "mid_transfer:1")
    monkeypatch.setenv("MIGRATOR_CRASH_MARKER", str(tmp_path / "crashes"))
    run_once(ctx, execute=False)  # plan only
    s = ctx.settings
    with session_scope(ctx.sessions) as session:
        ids = [j.id for j in claim(s.worker_id, limit=10, lease_seconds=s.lease_s, session=session)]
    assert len(ids) == 3
    no_retries = RayExecutor(max_retries=0)
    try:
        first = no_retries.run(ctx, ids)
    finally:
        no_retries.close()
    # One worker crash (two, if both tasks read the crash marker at the same instant).
    lost = [o for o in first if o.status == "retrying"]
    assert 1 <= len(lost) <= 2 and [o.status for o in first].count("failed") == 1
    assert {o.status for o in first} <= {"failed", "retrying", "succeeded"}
    for outcome in lost:
        assert "RemoteTaskLostError" in outcome.detail and "WorkerCrashedError" in outcome.detail

    again = run_once(ctx)  # backoff 0: the job's own retry, on the shared executor
    assert sorted((o.job_id, o.status) for o in again.outcomes) == sorted(
        (o.job_id, "succeeded") for o in lost
    )
    with session_scope(ctx.sessions) as session:
        assert {get_job(o.job_id, session=session).attempts for o in lost} == {2}
    _assert_each_good_job_registered_once(ctx, fleet)


def test_a_job_whose_lease_is_gone_is_not_submitted(ctx: Context) -> None:
    run_once(ctx, execute=False)
    s = ctx.settings
    with session_scope(ctx.sessions) as session:
        job = claim(s.worker_id, limit=1, lease_seconds=s.lease_s, session=session)[0]
        job_id = job.id
        job.lease_owner = "another-replica"  # reclaimed meanwhile
    versions_before = _versions_per_job(ctx)
    outcomes = RayExecutor.shared(s).run(ctx, [job_id])
    assert [(o.job_id, o.status) for o in outcomes] == [(job_id, "lease_lost")]
    assert _versions_per_job(ctx) == versions_before
    with session_scope(ctx.sessions) as session:
        assert get_job(job_id, session=session).lease_owner == "another-replica"
