"""Workers claim runnable jobs under a lease, renew it by heartbeat, and finish or fail them.

Claiming (one statement, then transitions in Python, all in the caller's transaction):

* candidates are approved jobs that are due (``next_attempt_at`` unset or passed) and running
  jobs whose lease has expired (their worker crashed or hung: they are reclaimed);
* PostgreSQL: ``SELECT ... FOR UPDATE SKIP LOCKED``: replicas claiming at the same time lock
  disjoint rows, and a row another claimer has just taken no longer matches once re-checked;
* SQLite: the engine begins every transaction with ``BEGIN IMMEDIATE`` (:mod:`db.engine`), so
  claimers in different processes run one after the other and each sees the previous one's
  commit.

Every status change goes through :func:`db.status.transition`. A worker only touches a job
while it is running under its own name; otherwise :class:`~db.errors.LeaseLostError`.
Times are the workers' clocks (UTC): replicas need synchronised clocks and a lease well above
any skew.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select
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
    "heartbeat",
    "hold",
    "release",
]

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
    ``now + lease_seconds``; ``attempts`` counts the claim. A running job whose lease expired
    goes back to approved (reclaim) and is claimed like any other; if it has already used
    ``max_attempts`` it becomes failed instead ("lease expired"), so a job that kills its
    workers cannot loop forever.

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
    expired = and_(TransferJob.status == JobStatus.RUNNING, TransferJob.lease_expires_at <= now)
    stmt = (
        select(TransferJob)
        .where(or_(due, expired))
        .order_by(TransferJob.id)
        .limit(limit)
        .with_for_update(skip_locked=True)  # PostgreSQL; SQLite renders no FOR UPDATE
        .execution_options(populate_existing=True)
    )
    claimed: list[TransferJob] = []
    for job in session.scalars(stmt):
        if job.status is JobStatus.RUNNING:  # its lease expired
            if job.attempts >= job.max_attempts:
                transition(job, JobStatus.FAILED, now=now)
                job.last_error = (
                    f"lease of {job.lease_owner!r} expired at attempt {job.attempts} of "
                    f"{job.max_attempts}; not retried automatically"
                )
                _clear_lease(job)
                continue
            transition(job, JobStatus.APPROVED, now=now)  # reclaim
        transition(job, JobStatus.RUNNING, now=now)
        job.attempts += 1
        job.lease_owner = worker_id
        job.lease_expires_at = lease_until
        job.heartbeat_at = now
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
    """Give a running job back unfinished (graceful shutdown): approved again at once, and the
    claim does not count as an attempt.

    Raises:
        LeaseLostError: the job is no longer running under ``worker_id``.
    """
    now = now or utcnow()
    job = _held_job(job_id, worker_id, session=session)
    transition(job, JobStatus.APPROVED, now=now)
    _clear_lease(job)
    job.attempts = max(0, job.attempts - 1)
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
    (:func:`db.jobs.retry`). Bad input (``retryable=False``) is not worth retrying.

    Raises:
        LeaseLostError: the job is no longer running under ``worker_id``.
    """
    now = now or utcnow()
    backoff = backoff or BackoffPolicy()
    job = _held_job(job_id, worker_id, session=session)
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
