"""The seam between the pass and where its jobs run: the :class:`Executor` protocol, how a job's
run ends (:class:`JobOutcome`), and giving unstarted jobs back.

Executors (``migrator.executors``: in this process, or on a Ray cluster) implement the protocol
and import the pipeline; the pipeline never imports them: the entry point builds one and puts it
on the pass's :class:`~migrator.pipeline.context.Context`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from db import LeaseLostError, release, session_scope

if TYPE_CHECKING:
    from migrator.pipeline.context import Context
    from migrator.registry import ModelVersionInfo

__all__ = [
    "FAILURES",
    "FINISHED",
    "UNFINISHED",
    "Executor",
    "JobOutcome",
    "OutcomeStatus",
    "release_jobs",
]


class OutcomeStatus(StrEnum):
    """How one job's run ended in this process."""

    SUCCEEDED = "succeeded"  # registered; the job is succeeded
    FAILED = "failed"  # failed for good: an admin may retry
    RETRYING = "retrying"  # failed; retried automatically after a backoff
    LEASE_LOST = "lease_lost"  # another worker holds it now: its outcome is theirs
    RELEASED = "released"  # given back before it started (a stop was asked)


#: Outcomes after which the job was worked on and its result recorded here.
FINISHED: frozenset[OutcomeStatus] = frozenset(
    {OutcomeStatus.SUCCEEDED, OutcomeStatus.FAILED, OutcomeStatus.RETRYING}
)
#: Outcomes that leave the job to another run (this process recorded nothing).
UNFINISHED: frozenset[OutcomeStatus] = frozenset({OutcomeStatus.LEASE_LOST, OutcomeStatus.RELEASED})
#: Outcomes that make ``migrator tick`` exit 1.
FAILURES: frozenset[OutcomeStatus] = frozenset({OutcomeStatus.FAILED, OutcomeStatus.RETRYING})


@dataclass(frozen=True)
class JobOutcome:
    """How one job ended in this process."""

    job_id: int
    status: OutcomeStatus
    detail: str
    result_ref: str | None = None


class Executor(Protocol):
    """Runs claimed jobs; may factorize bases ahead of their assessment."""

    def run(self, ctx: Context, job_ids: Sequence[int]) -> list[JobOutcome]:
        """Execute claimed jobs; return one outcome per job."""
        ...

    def prefetch(self, ctx: Context, bases: Sequence[ModelVersionInfo]) -> None:
        """Factorize ``bases`` into the factorization cache before they are assessed (the
        assessment factorizes whatever is still missing itself, so this may do nothing).

        Raises:
            InputError: unusable weights (as the assessment would).
        """
        ...


def release_jobs(ctx: Context, job_ids: Sequence[int]) -> list[JobOutcome]:
    """Give claimed but unstarted jobs back (a stop was requested)."""
    outcomes = []
    for job_id in job_ids:
        try:
            with session_scope(ctx.sessions) as session:
                release(job_id, ctx.settings.worker_id, session=session)
            outcomes.append(
                JobOutcome(job_id, OutcomeStatus.RELEASED, "stop requested before it started")
            )
        except LeaseLostError:
            pass
    return outcomes
