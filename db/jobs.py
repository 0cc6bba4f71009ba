"""Transfer jobs: created once per (adapter version, target base), moved by the ATC policy and
by admins. Every approval, rejection, force and retry writes an :class:`~db.models.AuditEvent`.

All functions take a keyword-only ``session``, flush, and never commit: the caller's
:func:`~db.engine.session_scope` owns the transaction.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.enums import AuditAction
from db.errors import IllegalTransitionError, JobNotFoundError, ReasonRequiredError
from db.idempotent import insert_or_get
from db.models import AdapterVersion, Assessment, AuditEvent, TransferJob
from db.status import JobStatus, transition
from db.timestamps import utcnow

__all__ = [
    "ALREADY_APPROVED",
    "DEFAULT_MAX_ATTEMPTS",
    "POLICY_ACTOR",
    "apply_policy_decision",
    "approve",
    "audit_trail",
    "count_by_status",
    "force",
    "get_job",
    "get_or_create_job",
    "job_for_lineage",
    "list_jobs",
    "pending_approvals",
    "record_audit",
    "reject",
    "replan_job",
    "retry",
    "stale_pending_jobs",
]

DEFAULT_MAX_ATTEMPTS = 3
#: The actor of decisions the ATC policy takes on its own.
POLICY_ACTOR = "policy"

_POLICY_DECISIONS = frozenset({JobStatus.APPROVED, JobStatus.PENDING_APPROVAL, JobStatus.SKIPPED})


def get_or_create_job(
    adapter_version_id: int,
    target_base_id: int,
    *,
    source_base_id: int,
    session: Session,
    assessment_id: int | None = None,
    atc: float | None = None,
    mode: str = "project",
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> tuple[TransferJob, bool]:
    """The one job for (adapter version, target base), created ``planned`` if there is none.

    Idempotent by key: a second request for the same pair is refused and the first job is
    returned unchanged, also when another transaction creates it concurrently.

    Returns:
        ``(job, created)``.
    """
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, not {max_attempts}")
    return insert_or_get(
        TransferJob,
        {"adapter_version_id": adapter_version_id, "target_base_id": target_base_id},
        lambda: TransferJob(
            adapter_version_id=adapter_version_id,
            target_base_id=target_base_id,
            source_base_id=source_base_id,
            assessment_id=assessment_id,
            atc=atc,
            mode=mode,
            max_attempts=max_attempts,
            status=JobStatus.PLANNED,
        ),
        session=session,
    )


def get_job(job_id: int, *, session: Session, for_update: bool = False) -> TransferJob:
    """The job with ``job_id``, freshly read; ``for_update`` locks its row (PostgreSQL).

    Raises:
        JobNotFoundError: there is none.
    """
    job = session.get(
        TransferJob, job_id, with_for_update=for_update or None, populate_existing=True
    )
    if job is None:
        raise JobNotFoundError(job_id)
    return job


def record_audit(
    job: TransferJob,
    action: AuditAction,
    *,
    actor: str,
    reason: str | None,
    from_status: JobStatus,
    session: Session,
    at: datetime | None = None,
) -> AuditEvent:
    """Append an audit row for ``job`` (its current status is the ``to_status``)."""
    event = AuditEvent(
        job_id=job.id,
        action=action,
        actor=actor,
        reason=reason,
        from_status=from_status,
        to_status=job.status,
        at=at or utcnow(),
    )
    session.add(event)
    session.flush()
    return event


def apply_policy_decision(
    job_id: int,
    decision: JobStatus,
    *,
    reason: str,
    session: Session,
    atc: float | None = None,
    actor: str = POLICY_ACTOR,
    signals: list[dict[str, Any]] | None = None,
) -> TransferJob:
    """Move a planned job to the policy's decision: approved, pending_approval or skipped.

    The decision, its reason and its signals stay on the job (``policy_decision``,
    ``policy_reason``, ``signals``); an audit row records it (action ``approve`` when approved
    automatically, else ``policy``).

    Raises:
        ValueError: ``decision`` is not one of the three.
        IllegalTransitionError: the job is not planned.
    """
    decision = JobStatus(decision)
    if decision not in _POLICY_DECISIONS:
        raise ValueError(f"a policy decides approved, pending_approval or skipped, not {decision}")
    job = get_job(job_id, session=session, for_update=True)
    now = utcnow()
    previous = transition(job, decision, now=now)
    job.policy_decision = decision
    job.policy_reason = reason
    if signals is not None:
        job.signals = list(signals)
    if atc is not None:
        job.atc = atc
    action = AuditAction.APPROVE if decision is JobStatus.APPROVED else AuditAction.POLICY
    record_audit(
        job, action, actor=actor, reason=reason, from_status=previous, session=session, at=now
    )
    return job


def _admin_action(
    job_id: int,
    action: AuditAction,
    *,
    allowed_from: Collection[JobStatus],
    to: JobStatus,
    actor: str,
    reason: str | None,
    reason_required: bool,
    hint: str,
    session: Session,
) -> TransferJob:
    if reason_required and not (reason and reason.strip()):
        raise ReasonRequiredError(action.value, job_id)
    job = get_job(job_id, session=session, for_update=True)
    if job.status not in allowed_from:
        raise IllegalTransitionError(job.id, job.status.value, to.value, hint, action=action.value)
    now = utcnow()
    previous = transition(job, to, now=now)
    if action is AuditAction.RETRY:
        # A new budget of automatic attempts, starting now.
        job.attempts = 0
        job.next_attempt_at = None
    record_audit(
        job, action, actor=actor, reason=reason, from_status=previous, session=session, at=now
    )
    return job


#: Statuses of a job that was approved already: approving it again changes nothing.
ALREADY_APPROVED = frozenset({JobStatus.APPROVED, JobStatus.RUNNING, JobStatus.SUCCEEDED})


def approve(job_id: int, actor: str, reason: str | None = None, *, session: Session) -> TransferJob:
    """An admin approves a job pending approval. Approving a job that is approved already
    (approved, running or succeeded) is a no-op: the job and its audit trail stay as they are.

    Raises:
        JobNotFoundError, IllegalTransitionError (not pending approval, nor approved already).
    """
    job = get_job(job_id, session=session)
    if job.status in ALREADY_APPROVED:
        return job
    return _admin_action(
        job_id,
        AuditAction.APPROVE,
        allowed_from={JobStatus.PENDING_APPROVAL},
        to=JobStatus.APPROVED,
        actor=actor,
        reason=reason,
        reason_required=False,
        hint="approve applies to pending_approval jobs; use force for skipped or rejected ones",
        session=session,
    )


def reject(job_id: int, actor: str, reason: str, *, session: Session) -> TransferJob:
    """An admin rejects a job pending approval; the reason is required.

    Raises:
        ReasonRequiredError, JobNotFoundError, IllegalTransitionError (not pending approval).
    """
    return _admin_action(
        job_id,
        AuditAction.REJECT,
        allowed_from={JobStatus.PENDING_APPROVAL},
        to=JobStatus.REJECTED,
        actor=actor,
        reason=reason,
        reason_required=True,
        hint="reject applies to pending_approval jobs",
        session=session,
    )


def force(job_id: int, actor: str, reason: str, *, session: Session) -> TransferJob:
    """An admin overrides the policy (skipped) or a rejection: the job becomes approved.

    Raises:
        ReasonRequiredError, JobNotFoundError, IllegalTransitionError (not skipped or rejected).
    """
    return _admin_action(
        job_id,
        AuditAction.FORCE,
        allowed_from={JobStatus.SKIPPED, JobStatus.REJECTED},
        to=JobStatus.APPROVED,
        actor=actor,
        reason=reason,
        reason_required=True,
        hint="force applies to skipped or rejected jobs; use approve or retry otherwise",
        session=session,
    )


def retry(job_id: int, actor: str, reason: str | None = None, *, session: Session) -> TransferJob:
    """An admin retries a failed job: approved again, runnable at once, attempts reset to 0.

    Raises:
        JobNotFoundError, IllegalTransitionError (not failed).
    """
    return _admin_action(
        job_id,
        AuditAction.RETRY,
        allowed_from={JobStatus.FAILED},
        to=JobStatus.APPROVED,
        actor=actor,
        reason=reason,
        reason_required=False,
        hint="retry applies to failed jobs",
        session=session,
    )


def list_jobs(
    *,
    session: Session,
    statuses: Collection[JobStatus] | None = None,
    adapter_version_id: int | None = None,
    target_base_id: int | None = None,
    limit: int | None = None,
) -> Sequence[TransferJob]:
    """Jobs, oldest first, optionally filtered by status, adapter version and target base."""
    stmt = select(TransferJob).order_by(TransferJob.id)
    if statuses is not None:
        stmt = stmt.where(TransferJob.status.in_([JobStatus(s) for s in statuses]))
    if adapter_version_id is not None:
        stmt = stmt.where(TransferJob.adapter_version_id == adapter_version_id)
    if target_base_id is not None:
        stmt = stmt.where(TransferJob.target_base_id == target_base_id)
    if limit is not None:
        stmt = stmt.limit(limit)
    return session.scalars(stmt).all()


def pending_approvals(*, session: Session) -> Sequence[TransferJob]:
    """Jobs waiting for an admin's approve or reject, oldest first."""
    return list_jobs(session=session, statuses={JobStatus.PENDING_APPROVAL})


def count_by_status(*, session: Session) -> dict[JobStatus, int]:
    """How many jobs are in each status (every status present, zeros included)."""
    counts = dict.fromkeys(JobStatus, 0)
    rows = session.execute(
        select(TransferJob.status, func.count()).group_by(TransferJob.status)
    ).all()
    for status, count in rows:
        counts[JobStatus(status)] = int(count)
    return counts


def audit_trail(job_id: int, *, session: Session) -> Sequence[AuditEvent]:
    """The job's audit rows, oldest first."""
    return session.scalars(
        select(AuditEvent).where(AuditEvent.job_id == job_id).order_by(AuditEvent.id)
    ).all()


def job_for_lineage(
    adapter_name: str, target_base_id: int, *, session: Session
) -> TransferJob | None:
    """The job (any status) carrying some version of adapter model ``adapter_name`` to the
    target base, if one exists: the service plans one job per lineage and target."""
    return session.scalars(
        select(TransferJob)
        .join(AdapterVersion, TransferJob.adapter_version_id == AdapterVersion.id)
        .where(AdapterVersion.name == adapter_name, TransferJob.target_base_id == target_base_id)
        .order_by(TransferJob.id)
        .limit(1)
    ).first()


def stale_pending_jobs(current_params_hash: str, *, session: Session) -> Sequence[TransferJob]:
    """Jobs waiting for approval whose assessment was made under other parameters (or is gone),
    oldest first."""
    return session.scalars(
        select(TransferJob)
        .outerjoin(Assessment, TransferJob.assessment_id == Assessment.id)
        .where(TransferJob.status == JobStatus.PENDING_APPROVAL)
        .where((Assessment.id.is_(None)) | (Assessment.params_hash != current_params_hash))
        .order_by(TransferJob.id)
    ).all()


def replan_job(
    job_id: int,
    *,
    assessment_id: int,
    atc: float,
    decision: JobStatus,
    reason: str,
    session: Session,
    actor: str = POLICY_ACTOR,
    signals: list[dict[str, Any]] | None = None,
) -> TransferJob:
    """Plan a job waiting for approval again under a new assessment, with an audit row.

    Approved by the policy now: it becomes approved (action ``approve``). Otherwise it keeps
    waiting for an admin (action ``policy``, status unchanged), also when the policy would now
    skip it: an admin decides, as before.

    Raises:
        JobNotFoundError; IllegalTransitionError: the job is not pending approval.
    """
    decision = JobStatus(decision)
    job = get_job(job_id, session=session, for_update=True)
    if job.status is not JobStatus.PENDING_APPROVAL:
        raise IllegalTransitionError(job.id, job.status.value, decision.value, "re-plan")
    now = utcnow()
    job.assessment_id, job.atc = assessment_id, atc
    job.policy_decision, job.policy_reason = decision, reason
    if signals is not None:
        job.signals = list(signals)
    previous = job.status
    action = AuditAction.POLICY
    if decision is JobStatus.APPROVED:
        transition(job, JobStatus.APPROVED, now=now)
        action = AuditAction.APPROVE
    else:
        job.updated_at = now
    record_audit(
        job, action, actor=actor, reason=reason, from_status=previous, session=session, at=now
    )
    return job
