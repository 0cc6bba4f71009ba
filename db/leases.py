"""Workers claim runnable jobs under a lease, renew it by heartbeat, and finish or fail them.

Claiming (one statement, then transitions in Python, all in the caller's transaction):

* candidates are approved jobs that are due (``next_attempt_at`` unset or passed) and running
  jobs whose lease has expired (their worker crashed or hung: they are reclaimed);
* PostgreSQL: ``SELECT ... FOR UPDATE SKIP LOCKED``: replicas claiming at the same time lock
  disjoint rows, and a row another claimer has just taken no longer matches once re-checked;
* SQLite: the engine begins every transaction with ``BEGIN IMMEDIATE`` (:mod:`db.engine`), so
  claimers in different processes run one after the other and each sees the previous one's
  commit.

Attempts are spent by work, not by claims: :func:`start` counts one when an executor begins a
job's work. A batch claimed together and lost (the worker crashed) costs its queued jobs
nothing; the job whose work had begun has spent its attempt, and one that has spent
``max_attempts`` that way fails for good when its lease is found expired (logged at ERROR;
:func:`fail_exhausted_leases` returns them for the pass to report).

Every status change goes through :func:`db.status.transition`. A worker only touches a job
while it is running under its own name; otherwise :class:`~db.errors.LeaseLostError`.
Times are the workers' clocks (UTC): replicas need synchronised clocks and a lease well above
any skew.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, select
from sqlalchemy.orm import Session

from db.engine import SQLITE_IMMEDIATE_FLAG
from db.enums import AuditAction
from db.errors import LeaseLostError
from db.jobs import POLICY_ACTOR, get_job, record_audit
from db.lineage import record_lineage
from db.models import TransferJob
from db.status import JobStatus, transition
from db.timestamps import utcnow

__all__ = [
    "DEFAULT_LEASE_S",
    "SYSTEM_ACTOR",
    "BackoffPolicy",
    "claim",
    "complete",
    "fail",
    "fail_exhausted_leases",
    "heartbeat",
    "hold",
    "release",
    "start",
]

log = logging.getLogger(__name__)

DEFAULT_LEASE_S = 300.0
#: The actor of automatic retries.
SYSTEM_ACTOR = "system"


@dataclass(frozen=True)
class BackoffPolicy:
    """Delay before the n-th automatic retry: ``min(max_s, base_s * 2 ** (n - 1))``.

    With the defaults: 30 s, 60 s, 120 s, ... capped at one hour.
    """

    base_s: float = 30.0
    max_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.base_s < 0 or self.max_s < 0:
            raise ValueError(f"backoff times must be >= 0, got {self.base_s}, {self.max_s}")

    def delay(self, attempts: int) -> timedelta:
        """The wait after ``attempts`` (>= 1) failed attempts."""
        exponent = max(0, attempts - 1)
        # Cap the exponent too: 2 ** 10_000 as a float overflows.
        seconds = self.base_s * 2.0 ** min(exponent, 64)
        return timedelta(seconds=min(self.max_s, seconds))


def _lease_until(now: datetime, lease_seconds: float) -> datetime:
    if lease_seconds <= 0:
        raise ValueError(f"lease_seconds must be positive, not {lease_seconds}")
    return now + timedelta(seconds=lease_seconds)


def _clear_lease(job: TransferJob) -> None:
    job.lease_owner = None
    job.lease_expires_at = None
    job.started_at = None


def _expired(now: datetime) -> ColumnElement[bool]:
    return and_(TransferJob.status == JobStatus.RUNNING, TransferJob.lease_expires_at <= now)


def _fail_if_exhausted(job: TransferJob, now: datetime) -> bool:
    """Fail for good a job whose lease expired after it spent its last attempt."""
    if job.started_at is None or job.attempts < job.max_attempts:
        return False
    transition(job, JobStatus.FAILED, now=now)
    job.last_error = (
        f"lease of {job.lease_owner!r} expired at attempt {job.attempts} of "
        f"{job.max_attempts}; not retried automatically"
    )
    log.error(
        "job %d failed for good: %s (`migrator jobs retry %d`)", job.id, job.last_error, job.id
    )
    _clear_lease(job)
    return True


def fail_exhausted_leases(*, session: Session, now: datetime | None = None) -> list[TransferJob]:
    """Fail for good every running job whose lease expired after its work spent the last
    attempt (its worker died ``max_attempts`` times on it); each is logged at ERROR.

    Returns:
        The jobs failed now (possibly none).
    """
    now = now or utcnow()
    stmt = (
        select(TransferJob)
        .where(_expired(now), TransferJob.started_at.is_not(None))
        .where(TransferJob.attempts >= TransferJob.max_attempts)
        .order_by(TransferJob.id)
        .with_for_update(skip_locked=True)
        .execution_options(populate_existing=True)
    )
    failed = [job for job in session.scalars(stmt) if _fail_if_exhausted(job, now)]
    session.flush()
    return failed


def claim(
    worker_id: str,
    *,
    session: Session,
    limit: int = 1,
    lease_seconds: float = DEFAULT_LEASE_S,
    now: datetime | None = None,
) -> list[TransferJob]:
    """Claim up to ``limit`` runnable jobs for ``worker_id``, oldest first.

    Each claimed job becomes running with ``lease_owner = worker_id`` and a lease until
    ``now + lease_seconds``; the claim spends no attempt (:func:`start` does). A running job
    whose lease expired goes back to approved (reclaim) and is claimed like any other, at no
    cost if its work had not begun; if its work had begun on its last attempt it becomes
    failed instead ("lease expired"), so a job that kills its workers cannot loop forever.

    Commit soon after: on PostgreSQL the claimed rows stay locked until then, on SQLite the
    whole database does.

    Returns:
        The claimed jobs (possibly none).

    Raises:
        RuntimeError: a SQLite session whose engine was not made by :func:`db.make_engine`.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    connection = session.connection()
    if connection.dialect.name == "sqlite" and not connection.info.get(SQLITE_IMMEDIATE_FLAG):
        # A deferred SQLite transaction lets two processes read the same runnable row.
        raise RuntimeError("claim() on SQLite needs an engine made by db.make_engine")
    now = now or utcnow()
    lease_until = _lease_until(now, lease_seconds)
    due = and_(
        TransferJob.status == JobStatus.APPROVED,
        or_(TransferJob.next_attempt_at.is_(None), TransferJob.next_attempt_at <= now),
    )
    stmt = (
        select(TransferJob)
        .where(or_(due, _expired(now)))
        .order_by(TransferJob.id)
        .limit(limit)
        .with_for_update(skip_locked=True)  # PostgreSQL; SQLite renders no FOR UPDATE
        .execution_options(populate_existing=True)
    )
    claimed: list[TransferJob] = []
    for job in session.scalars(stmt):
        if job.status is JobStatus.RUNNING:  # its lease expired
            if _fail_if_exhausted(job, now):
                continue
            transition(job, JobStatus.APPROVED, now=now)  # reclaim
        transition(job, JobStatus.RUNNING, now=now)
        job.lease_owner = worker_id
        job.lease_expires_at = lease_until
        job.heartbeat_at = now
        job.started_at = None
        job.next_attempt_at = None
        claimed.append(job)
    session.flush()
    return claimed


def _held_job(job_id: int, worker_id: str, *, session: Session) -> TransferJob:
    """The job, row-locked, if ``worker_id`` holds its lease; else LeaseLostError."""
    job = get_job(job_id, session=session, for_update=True)
    if job.status is not JobStatus.RUNNING or job.lease_owner != worker_id:
        raise LeaseLostError(job_id, worker_id, job.status.value, job.lease_owner)
    return job


def start(
    job_id: int, worker_id: str, *, session: Session, now: datetime | None = None
) -> TransferJob:
    """The executor begins the job's work: one attempt is spent (once per lease; a second call
    under the same lease changes nothing).

    Raises:
        LeaseLostError: the job is no longer running under ``worker_id``.
    """
    now = now or utcnow()
    job = _held_job(job_id, worker_id, session=session)
    if job.started_at is None:
        job.started_at = now
        job.attempts += 1
        session.flush()
    return job


def heartbeat(
    job_id: int,
    worker_id: str,
    *,
    session: Session,
    lease_seconds: float = DEFAULT_LEASE_S,
    now: datetime | None = None,
) -> TransferJob:
    """Renew ``worker_id``'s lease on a running job until ``now + lease_seconds``.

    A lease that expired but was not reclaimed yet is renewed (nobody else started the job).

    Raises:
        LeaseLostError: the job is no longer running under ``worker_id``.
    """
    now = now or utcnow()
    job = _held_job(job_id, worker_id, session=session)
    job.lease_expires_at = _lease_until(now, lease_seconds)
    job.heartbeat_at = now
    session.flush()
    return job


def release(
    job_id: int, worker_id: str, *, session: Session, now: datetime | None = None
) -> TransferJob:
    """Give a running job back unfinished (a stop, or the registry or database unreachable):
    approved again at once. An attempt its work had begun is given back too: the job was not at
    fault.

    Raises:
        LeaseLostError: the job is no longer running under ``worker_id``.
    """
    now = now or utcnow()
    job = _held_job(job_id, worker_id, session=session)
    transition(job, JobStatus.APPROVED, now=now)
    if job.started_at is not None:
        job.attempts = max(0, job.attempts - 1)
    _clear_lease(job)
    job.next_attempt_at = None
    session.flush()
    return job


def complete(
    job_id: int,
    worker_id: str,
    *,
    session: Session,
    result_adapter_version_id: int | None = None,
    result_ref: str | None = None,
    mlflow_run_id: str | None = None,
    now: datetime | None = None,
) -> TransferJob:
    """Mark a running job succeeded with its result; with ``result_adapter_version_id`` the
    lineage edge (job's adapter version -> result) is recorded too.

    Raises:
        LeaseLostError: the job is no longer running under ``worker_id`` (it may have been
            reclaimed: the caller must not report this result).
    """
    now = now or utcnow()
    job = _held_job(job_id, worker_id, session=session)
    transition(job, JobStatus.SUCCEEDED, now=now)
    _clear_lease(job)
    job.last_error = None
    job.result_adapter_version_id = result_adapter_version_id
    job.result_ref = result_ref
    job.mlflow_run_id = mlflow_run_id
    if result_adapter_version_id is not None:
        record_lineage(
            job.adapter_version_id, result_adapter_version_id, job_id=job.id, session=session
        )
    session.flush()
    return job


def fail(
    job_id: int,
    worker_id: str,
    error: str,
    *,
    session: Session,
    retryable: bool = True,
    backoff: BackoffPolicy | None = None,
    now: datetime | None = None,
) -> TransferJob:
    """Mark a running job failed; retry it automatically when allowed.

    With ``retryable`` and fewer than ``max_attempts`` attempts so far, the job goes
    failed -> approved with ``next_attempt_at = now + backoff.delay(attempts)`` and an audit
    row (action retry, actor ``system``). Otherwise it stays failed for an admin
    (:func:`db.jobs.retry`). Bad input (``retryable=False``) is not worth retrying. A failure
    of a job whose work was not marked started (:func:`start`) still spends an attempt, so a
    job that keeps failing cannot loop forever.

    Raises:
        LeaseLostError: the job is no longer running under ``worker_id``.
    """
    now = now or utcnow()
    backoff = backoff or BackoffPolicy()
    job = _held_job(job_id, worker_id, session=session)
    if job.started_at is None:
        job.attempts += 1
    transition(job, JobStatus.FAILED, now=now)
    _clear_lease(job)
    job.last_error = error
    if retryable and job.attempts < job.max_attempts:
        delay = backoff.delay(job.attempts)
        transition(job, JobStatus.APPROVED, now=now)
        job.next_attempt_at = now + delay
        record_audit(
            job,
            AuditAction.RETRY,
            actor=SYSTEM_ACTOR,
            reason=(
                f"automatic retry {job.attempts}/{job.max_attempts - 1} in "
                f"{delay.total_seconds():g} s after: {error}"
            ),
            from_status=JobStatus.FAILED,
            session=session,
            at=now,
        )
    session.flush()
    return job


def hold(
    job_id: int,
    worker_id: str,
    reason: str,
    *,
    session: Session,
    signals: list[dict[str, Any]] | None = None,
    now: datetime | None = None,
) -> TransferJob:
    """Hold a running job for an admin: a signal measured on its result failed, so nothing was
    registered. It waits for approval (``approve`` runs it again, and its result is registered
    whatever the signals then); the attempt it used stays counted. An audit row (action
    ``policy``) gives the reason.

    Raises:
        LeaseLostError: the job is no longer running under ``worker_id``.
    """
    now = now or utcnow()
    job = _held_job(job_id, worker_id, session=session)
    transition(job, JobStatus.PENDING_APPROVAL, now=now)
    _clear_lease(job)
    job.policy_decision = JobStatus.PENDING_APPROVAL
    job.policy_reason = reason
    if signals is not None:
        job.signals = [*(job.signals or []), *signals]
    record_audit(
        job,
        AuditAction.POLICY,
        actor=POLICY_ACTOR,
        reason=reason,
        from_status=JobStatus.RUNNING,
        session=session,
        at=now,
    )
    session.flush()
    return job
