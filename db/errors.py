"""Typed errors of the job database.

Each message is one line a user can act on; the CLI prints it as is. Errors that mean "the
request does not fit the job's state" derive from :class:`JobStateError` so a caller can map
them to exit code 2 in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "STATE_PHRASES",
    "DatabaseNotAtHeadError",
    "IllegalTransitionError",
    "JobDatabaseError",
    "JobNotFoundError",
    "JobStateError",
    "LeaseLostError",
    "ReasonRequiredError",
    "SchemaDriftError",
]


class JobDatabaseError(Exception):
    """Base class of every error raised by ``db``."""


class JobStateError(JobDatabaseError):
    """A request that the job's current state does not allow."""


#: How messages say that a job is in a status ("job 3 has succeeded", not "is succeeded").
STATE_PHRASES = {
    "planned": "is planned",
    "pending_approval": "is waiting for approval",
    "approved": "is approved",
    "running": "is running",
    "succeeded": "has succeeded",
    "failed": "has failed",
    "skipped": "was skipped",
    "rejected": "was rejected",
}


class IllegalTransitionError(JobStateError):
    """A status change that is not an edge of the job state machine.

    Attributes:
        job_id: the job concerned (None for a job not yet flushed).
        current: its status.
        requested: the status asked for.
        action: the command refused (``retry``...), when a command asked for the change.
    """

    def __init__(
        self,
        job_id: int | None,
        current: str,
        requested: str,
        hint: str | None = None,
        *,
        action: str | None = None,
    ) -> None:
        self.job_id = job_id
        self.current = current
        self.requested = requested
        self.action = action
        who = "job" if job_id is None else f"job {job_id}"
        state = STATE_PHRASES.get(current, f"is {current}")
        if action is not None:
            message = f"cannot {action} {who}: it {state}"
        else:
            message = f"{who} {state}: it cannot become {requested}"
        super().__init__(f"{message} ({hint})" if hint else message)


class JobNotFoundError(JobDatabaseError, LookupError):
    """No job with the given id."""

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id
        super().__init__(f"no transfer job with id {job_id}")


class LeaseLostError(JobStateError):
    """A worker acted on a job whose lease it no longer holds (expired and reclaimed, or done)."""

    def __init__(self, job_id: int, worker_id: str, status: str, owner: str | None) -> None:
        self.job_id = job_id
        self.worker_id = worker_id
        super().__init__(
            f"worker {worker_id!r} no longer holds the lease on job {job_id} "
            f"(status {status}, lease owner {owner!r})"
        )


class ReasonRequiredError(JobDatabaseError, ValueError):
    """An admin action that must say why (reject, force) was given no reason."""

    def __init__(self, action: str, job_id: int) -> None:
        super().__init__(f"{action} of job {job_id} needs a reason")


class DatabaseNotAtHeadError(JobDatabaseError):
    """The job database schema is not at the revision this code expects."""

    def __init__(self, current: str | None, head: str) -> None:
        self.current = current
        self.head = head
        at = current if current is not None else "<empty>"
        super().__init__(
            f"database at revision {at}, code expects {head}: run `migrator db upgrade`"
        )


class SchemaDriftError(JobDatabaseError):
    """The database schema differs from the ORM models (a migration is missing)."""

    def __init__(self, diffs: Sequence[Any]) -> None:
        self.diffs = list(diffs)
        super().__init__(
            f"the database schema differs from the models in {len(self.diffs)} place(s): "
            f"{self.diffs!r}"
        )
