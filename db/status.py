"""The transfer job state machine: states, named groups and the one function that moves a job.

Edges (DESIGN.md, "Jobs and state", plus the three the service needs and documents here)::

    planned ──────────► approved | pending_approval | skipped     policy decision on the ATC
    pending_approval ─► approved | rejected                       an admin decides
    approved ─────────► running                                   a worker claims it
    running ──────────► succeeded | failed                        the worker finishes
    running ──────────► approved                                  lease expired (reclaim) or
                                                                  graceful release by its worker
    running ──────────► pending_approval                          held after the transfer: a
                                                                  signal measured on the result
                                                                  failed (nothing registered)
    failed ───────────► approved                                  retry: automatic with backoff
                                                                  until max_attempts, then admin
    skipped ──────────► approved                                  admin force (ATC above max_atc)
    rejected ─────────► approved                                  admin force (overrides a reject)

Everything else, self-loops included, raises :class:`~db.errors.IllegalTransitionError`. Which
*command* may take an edge (approve only from pending_approval, force only from skipped or
rejected, ...) is decided by the commands in :mod:`db.jobs`; this module only knows the graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING

from db.errors import IllegalTransitionError
from db.timestamps import utcnow

if TYPE_CHECKING:
    from db.models import TransferJob

__all__ = [
    "ACTIVE",
    "ALLOWED_TRANSITIONS",
    "RUNNABLE",
    "TERMINAL",
    "JobStatus",
    "can_transition",
    "transition",
]


class JobStatus(StrEnum):
    """Where a transfer job stands. The values are stored in the database."""

    PLANNED = "planned"  # created for (adapter version, target base); no policy decision yet
    PENDING_APPROVAL = (
        "pending_approval"  # ATC between auto_approve_atc and max_atc: an admin decides
    )
    APPROVED = "approved"  # may run once next_attempt_at (if set) has passed
    RUNNING = "running"  # a worker holds the lease (lease_owner, lease_expires_at)
    SUCCEEDED = "succeeded"  # transferred adapter registered; result recorded
    FAILED = "failed"  # last attempt failed and no automatic retry is left: an admin may retry
    SKIPPED = "skipped"  # ATC above max_atc (or nothing to transfer): an admin may force
    REJECTED = "rejected"  # an admin said no: an admin may still force


#: The legal edges, and the only source of truth for them.
ALLOWED_TRANSITIONS: Mapping[JobStatus, frozenset[JobStatus]] = {
    JobStatus.PLANNED: frozenset(
        {JobStatus.APPROVED, JobStatus.PENDING_APPROVAL, JobStatus.SKIPPED}
    ),
    JobStatus.PENDING_APPROVAL: frozenset({JobStatus.APPROVED, JobStatus.REJECTED}),
    JobStatus.APPROVED: frozenset({JobStatus.RUNNING}),
    JobStatus.RUNNING: frozenset(
        {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.APPROVED, JobStatus.PENDING_APPROVAL}
    ),
    JobStatus.FAILED: frozenset({JobStatus.APPROVED}),
    JobStatus.SKIPPED: frozenset({JobStatus.APPROVED}),
    JobStatus.REJECTED: frozenset({JobStatus.APPROVED}),
    JobStatus.SUCCEEDED: frozenset(),
}

#: Jobs with work or a decision still ahead of them without anyone stepping in.
ACTIVE: frozenset[JobStatus] = frozenset(
    {JobStatus.PLANNED, JobStatus.PENDING_APPROVAL, JobStatus.APPROVED, JobStatus.RUNNING}
)
#: Jobs that nothing moves automatically; failed, skipped and rejected ones can be reopened by
#: an admin (retry, force), succeeded is final.
TERMINAL: frozenset[JobStatus] = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.SKIPPED, JobStatus.REJECTED}
)
#: Jobs a worker may claim (when due); running jobs whose lease expired are reclaimed as well.
RUNNABLE: frozenset[JobStatus] = frozenset({JobStatus.APPROVED})


def can_transition(current: JobStatus, requested: JobStatus) -> bool:
    """Whether ``current -> requested`` is an edge of the state machine."""
    return requested in ALLOWED_TRANSITIONS[current]


def transition(
    job: TransferJob, requested: JobStatus, *, now: datetime | None = None, hint: str | None = None
) -> JobStatus:
    """Move ``job`` to ``requested``, refusing anything that is not an edge.

    Args:
        job: the job (attached to a session or not); only ``status`` and ``updated_at`` change.
        requested: the new status.
        now: the instant of the change (default: now, UTC).
        hint: appended to the error message, e.g. which command would apply instead.

    Returns:
        The previous status.

    Raises:
        IllegalTransitionError: ``job.status -> requested`` is not an edge.
    """
    current = JobStatus(job.status)
    requested = JobStatus(requested)
    if not can_transition(current, requested):
        raise IllegalTransitionError(job.id, current.value, requested.value, hint)
    job.status = requested
    job.updated_at = now or utcnow()
    return current
