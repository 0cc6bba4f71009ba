"""Where claimed jobs run: in this process (default) or on a Ray cluster (``executor=ray``).

The job database stays the source of truth either way: this process claims the jobs, keeps
their leases, and records how they end.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from db import LeaseLostError, release, session_scope
from migrator.pipeline.execution import JobOutcome, execute_job
from migrator.settings import ExecutorKind

if TYPE_CHECKING:
    from migrator.pipeline.context import Context
    from migrator.registry import ModelVersionInfo

__all__ = ["Executor", "LocalExecutor", "executor_for", "release_jobs"]

log = logging.getLogger(__name__)


class Executor(Protocol):
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
            outcomes.append(JobOutcome(job_id, "released", "stop requested before it started"))
        except LeaseLostError:
            pass
    return outcomes


class LocalExecutor:
    """Runs jobs one after the other in this process."""

    def run(self, ctx: Context, job_ids: Sequence[int]) -> list[JobOutcome]:
        outcomes: list[JobOutcome] = []
        for i, job_id in enumerate(job_ids):
            if ctx.stop.requested:
                outcomes.extend(release_jobs(ctx, job_ids[i:]))
                break
            outcomes.append(execute_job(ctx, job_id))
        return outcomes

    def prefetch(self, ctx: Context, bases: Sequence[ModelVersionInfo]) -> None:
        """Nothing ahead of time: the assessment factorizes in this process."""


_LOCAL = LocalExecutor()


def executor_for(ctx: Context) -> Executor:
    """The executor the settings ask for."""
    if ctx.settings.executor is ExecutorKind.RAY:
        from migrator.ray_executor import RayExecutor

        return RayExecutor.shared(ctx.settings)
    return _LOCAL
