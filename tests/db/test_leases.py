"""Claims, leases, heartbeats, completion and automatic retry with backoff (one process)."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker

from db import (
    AuditAction,
    BackoffPolicy,
    JobStatus,
    LeaseLostError,
    ancestors,
    audit_trail,
    claim,
    complete,
    fail,
    fail_exhausted_leases,
    get_job,
    heartbeat,
    migrations,
    release,
    retry,
    session_scope,
    start,
    utcnow,
)
from tests.db.seed import seed_adapter, seed_bases, seed_job, seed_runnable_jobs

S = JobStatus
LEASE = 60.0


def _claim(
    factory: sessionmaker[Session], worker: str, now: datetime, limit: int = 10
) -> list[int]:
    with session_scope(factory) as session:
        return [
            job.id
            for job in claim(worker, limit=limit, lease_seconds=LEASE, now=now, session=session)
        ]


def _start(factory: sessionmaker[Session], job_id: int, worker: str, now: datetime) -> int:
    """Mark the job's work begun; returns its attempts."""
    with session_scope(factory) as session:
        return start(job_id, worker, now=now, session=session).attempts


def _claim_and_start(factory: sessionmaker[Session], worker: str, now: datetime) -> list[int]:
    claimed = _claim(factory, worker, now)
    for job_id in claimed:
        _start(factory, job_id, worker, now)
    return claimed


def test_claim_takes_approved_jobs_once(factory: sessionmaker[Session]) -> None:
    now = utcnow()
    with session_scope(factory) as session:
        bases = seed_bases(session)
        runnable = [seed_job(session, bases, f"r{i}").id for i in range(3)]
        for name, decision in (("p", S.PENDING_APPROVAL), ("s", S.SKIPPED), ("n", None)):
            seed_job(session, bases, name, decision=decision)
    assert _claim(factory, "w1", now, limit=2) == runnable[:2]
    assert _claim(factory, "w2", now) == runnable[2:]
    assert _claim(factory, "w2", now) == []  # nothing else is runnable
    with session_scope(factory) as session:
        job = get_job(runnable[0], session=session)
        # Claimed, not started: no attempt spent yet.
        assert (job.status, job.lease_owner, job.attempts) == (S.RUNNING, "w1", 0)
        assert job.lease_expires_at == now + timedelta(seconds=LEASE)
        assert (job.heartbeat_at, job.started_at) == (now, None)
    assert _start(factory, runnable[0], "w1", now) == 1
    assert _start(factory, runnable[0], "w1", now) == 1  # once per lease
    with session_scope(factory) as session:
        assert get_job(runnable[0], session=session).started_at == now
        with pytest.raises(LeaseLostError):
            start(runnable[0], "w2", session=session)


def test_a_claim_lost_before_its_work_began_costs_nothing(
    factory: sessionmaker[Session],
) -> None:
    """A batch claimed by a worker that dies: its queued jobs keep their attempts, however
    often it happens; the job whose work had begun spends one each time."""
    now = utcnow()
    with session_scope(factory) as session:
        bases = seed_bases(session)
        ids = [seed_job(session, bases, f"b{i}", max_attempts=2).id for i in range(4)]
    for crash in range(5):
        claimed = _claim(factory, f"w{crash}", now, limit=4)
        assert sorted(claimed) == sorted(ids)
        if crash == 0:
            _start(factory, ids[0], "w0", now)  # the first job's work began, then the crash
        now += timedelta(seconds=LEASE + 1)
    with session_scope(factory) as session:
        jobs = [get_job(i, session=session) for i in ids]
        assert [j.attempts for j in jobs] == [1, 0, 0, 0]
        assert {j.status for j in jobs} == {S.RUNNING}
        assert {j.lease_owner for j in jobs} == {"w4"}


def test_expired_lease_is_reclaimed_and_old_holder_is_locked_out(
    factory: sessionmaker[Session],
) -> None:
    now = utcnow()
    with session_scope(factory) as session:
        (job_id,) = seed_runnable_jobs(session, 1)
    assert _claim_and_start(factory, "w1", now) == [job_id]
    assert _claim(factory, "w2", now + timedelta(seconds=LEASE - 1)) == []  # still held
    later = now + timedelta(seconds=LEASE + 1)
    assert _claim_and_start(factory, "w2", later) == [job_id]
    with session_scope(factory) as session:
        job = get_job(job_id, session=session)
        assert (job.lease_owner, job.attempts) == ("w2", 2)
        with pytest.raises(LeaseLostError, match="'w1' no longer holds the lease"):
            heartbeat(job_id, "w1", session=session)
        with pytest.raises(LeaseLostError):
            complete(job_id, "w1", result_ref="x/1", session=session)
        with pytest.raises(LeaseLostError):
            fail(job_id, "w1", "late", session=session)
        complete(job_id, "w2", result_ref="adapter/2", mlflow_run_id="run-2", session=session)
    with session_scope(factory) as session:
        job = get_job(job_id, session=session)
        assert (job.status, job.result_ref, job.mlflow_run_id) == (
            S.SUCCEEDED,
            "adapter/2",
            "run-2",
        )
        assert (job.lease_owner, job.lease_expires_at) == (None, None)
        with pytest.raises(LeaseLostError):  # finished: nobody holds it any more
            complete(job_id, "w2", session=session)


def test_heartbeat_extends_the_lease(factory: sessionmaker[Session]) -> None:
    now = utcnow()
    with session_scope(factory) as session:
        (job_id,) = seed_runnable_jobs(session, 1)
    _claim(factory, "w1", now)
    beat = now + timedelta(seconds=LEASE - 5)
    with session_scope(factory) as session:
        heartbeat(job_id, "w1", lease_seconds=LEASE, now=beat, session=session)
    # Past the first lease, not past the renewed one.
    assert _claim(factory, "w2", now + timedelta(seconds=LEASE + 5)) == []
    with session_scope(factory) as session:
        job = get_job(job_id, session=session)
        assert (job.lease_owner, job.heartbeat_at) == ("w1", beat)
        assert job.lease_expires_at == beat + timedelta(seconds=LEASE)


def test_release_gives_the_job_back_without_spending_an_attempt(
    factory: sessionmaker[Session],
) -> None:
    now = utcnow()
    with session_scope(factory) as session:
        (job_id,) = seed_runnable_jobs(session, 1)
    _claim(factory, "w1", now)  # released before its work began
    with session_scope(factory) as session:
        release(job_id, "w1", session=session)
        job = get_job(job_id, session=session)
        assert (job.status, job.attempts, job.lease_owner) == (S.APPROVED, 0, None)
    assert _claim_and_start(factory, "w2", now) == [job_id]
    with session_scope(factory) as session:
        assert get_job(job_id, session=session).attempts == 1
        release(job_id, "w2", session=session)  # begun, then given back: the attempt too
        job = get_job(job_id, session=session)
        assert (job.status, job.attempts, job.started_at) == (S.APPROVED, 0, None)


def test_failures_retry_with_backoff_then_wait_for_an_admin(factory: sessionmaker[Session]) -> None:
    backoff = BackoffPolicy(base_s=10, max_s=15)
    now = utcnow()
    with session_scope(factory) as session:
        job_id = seed_job(session, seed_bases(session), "flaky", max_attempts=3).id

    expected_delays = [10, 15]  # 10 * 2**0, min(15, 10 * 2**1)
    for attempt, delay in enumerate(expected_delays, start=1):
        assert _claim_and_start(factory, "w", now) == [job_id]
        with session_scope(factory) as session:
            job = fail(job_id, "w", f"boom {attempt}", backoff=backoff, now=now, session=session)
            assert job.status is S.APPROVED
            assert job.attempts == attempt
            assert job.next_attempt_at == now + timedelta(seconds=delay)
            assert job.last_error == f"boom {attempt}"
        assert _claim(factory, "w", now + timedelta(seconds=delay - 1)) == []  # not due yet
        now += timedelta(seconds=delay)

    assert _claim(factory, "w", now) == [job_id]  # a failure before start() still counts
    with session_scope(factory) as session:
        job = fail(job_id, "w", "boom 3", backoff=backoff, now=now, session=session)
        assert (job.status, job.attempts) == (S.FAILED, 3)  # max_attempts used up
    assert _claim(factory, "w", now + timedelta(days=1)) == []

    with session_scope(factory) as session:
        retries = [e for e in audit_trail(job_id, session=session) if e.action is AuditAction.RETRY]
        assert [(e.actor, e.from_status, e.to_status) for e in retries] == [
            ("system", S.FAILED, S.APPROVED)
        ] * 2
        assert "boom 2" in (retries[1].reason or "")
        retry(job_id, "admin", "fixed", session=session)
    assert _claim_and_start(factory, "w", now) == [job_id]
    with session_scope(factory) as session:
        assert get_job(job_id, session=session).attempts == 1


def test_bad_input_is_not_retried(factory: sessionmaker[Session]) -> None:
    now = utcnow()
    with session_scope(factory) as session:
        (job_id,) = seed_runnable_jobs(session, 1)
    _claim(factory, "w", now)
    with session_scope(factory) as session:
        job = fail(job_id, "w", "corrupt safetensors", retryable=False, session=session)
        assert (job.status, job.attempts, job.last_error) == (S.FAILED, 1, "corrupt safetensors")
        assert audit_trail(job_id, session=session)[-1].action is not AuditAction.RETRY


def test_a_job_whose_leases_keep_expiring_ends_failed(factory: sessionmaker[Session]) -> None:
    now = utcnow()
    with session_scope(factory) as session:
        job_id = seed_job(session, seed_bases(session), "poison", max_attempts=2).id
    assert _claim_and_start(factory, "w1", now) == [job_id]
    now += timedelta(seconds=LEASE + 1)
    assert _claim_and_start(factory, "w2", now) == [job_id]  # attempt 2 of 2
    now += timedelta(seconds=LEASE + 1)
    assert _claim(factory, "w3", now) == []
    with session_scope(factory) as session:
        job = get_job(job_id, session=session)
        assert (job.status, job.attempts, job.lease_owner) == (S.FAILED, 2, None)
        assert "lease of 'w2' expired" in (job.last_error or "")


def test_exhausted_leases_are_failed_and_reported(
    factory: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    now = utcnow()
    with session_scope(factory) as session:
        bases = seed_bases(session)
        poison = seed_job(session, bases, "poison", max_attempts=1).id
        queued = seed_job(session, bases, "queued", max_attempts=1).id
    assert sorted(_claim(factory, "w1", now)) == sorted([poison, queued])
    _start(factory, poison, "w1", now)
    with session_scope(factory) as session:
        assert fail_exhausted_leases(now=now, session=session) == []  # the lease still holds
    now += timedelta(seconds=LEASE + 1)
    with caplog.at_level("ERROR", logger="db.leases"), session_scope(factory) as session:
        failed = [j.id for j in fail_exhausted_leases(now=now, session=session)]
    assert failed == [poison]  # the queued job never started: it is reclaimed, not failed
    assert f"job {poison} failed for good" in caplog.text
    with session_scope(factory) as session:
        assert get_job(poison, session=session).status is S.FAILED
        assert get_job(queued, session=session).status is S.RUNNING
    assert _claim(factory, "w2", now) == [queued]


def test_complete_records_lineage(factory: sessionmaker[Session]) -> None:
    now = utcnow()
    with session_scope(factory) as session:
        bases = seed_bases(session)
        job = seed_job(session, bases, "style")
        result = seed_adapter(session, bases.new, "style", version="2")
        ids = (job.id, job.adapter_version_id, result.id)
    _claim(factory, "w", now)
    job_id, source_id, result_id = ids
    with session_scope(factory) as session:
        complete(
            job_id, "w", result_adapter_version_id=result_id, result_ref="style/2", session=session
        )
    with session_scope(factory) as session:
        assert get_job(job_id, session=session).result_adapter_version_id == result_id
        assert [(e.adapter.id, e.depth) for e in ancestors(result_id, session=session)] == [
            (source_id, 1)
        ]


def test_backoff_policy() -> None:
    policy = BackoffPolicy(base_s=30, max_s=3600)
    assert [policy.delay(n).total_seconds() for n in (1, 2, 3, 8, 10_000)] == [
        30,
        60,
        120,
        3600,
        3600,
    ]
    with pytest.raises(ValueError):
        BackoffPolicy(base_s=-1)


def test_claim_refuses_a_sqlite_engine_without_begin_immediate(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    migrations.upgrade(url)
    plain = create_engine(url)
    try:
        with Session(plain) as session, pytest.raises(RuntimeError, match=r"db\.make_engine"):
            claim("w", session=session)
    finally:
        plain.dispose()
