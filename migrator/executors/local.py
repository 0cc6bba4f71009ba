"""The default executor: claimed jobs run one after the other in this process."""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import partial

from db import LeaseLostError
from migrator.pipeline.breaker import outage_reason
from migrator.pipeline.context import Context
from migrator.pipeline.executor import JobOutcome, OutcomeStatus, release_jobs
from migrator.pipeline.lease_keeper import LeaseKeeper
from migrator.registry import ModelVersionInfo

__all__ = ["LocalExecutor"]


class LocalExecutor:
    """Runs claimed jobs one after the other in this process.

    Every claimed job's lease is kept alive from the start of the batch, so a job queued behind
    a long one is not reclaimed by another replica while it waits. A job's attempt is spent
    right before its transfer begins (:func:`~migrator.pipeline.execution.mark_started`), so
    the jobs still queued when this process dies cost nothing. A stop, or the pass's breaker
    (the registry or the database unreachable), releases the jobs not yet started.
    """

    def run(self, ctx: Context, job_ids: Sequence[int]) -> list[JobOutcome]:
        outcomes: list[JobOutcome] = []
        with LeaseKeeper(ctx) as leases:
            held = leases.hold(job_ids)
            outcomes += [
                JobOutcome(j, OutcomeStatus.LEASE_LOST, leases.lost[j])
                for j in job_ids
                if j not in held
            ]
            for i, job_id in enumerate(held):
                if ctx.stop.requested or ctx.breaker.tripped:
                    for rest in held[i:]:
                        leases.drop(rest)
                    outcomes.extend(release_jobs(ctx, held[i:]))
                    break
                outcomes.append(_run_one(ctx, job_id, leases))
                leases.drop(job_id)
        return outcomes

    def prefetch(self, ctx: Context, bases: Sequence[ModelVersionInfo]) -> None:
        """Nothing ahead of time: the assessment factorizes in this process."""


def _run_one(ctx: Context, job_id: int, leases: LeaseKeeper) -> JobOutcome:
    """Load one claimed job, spend its attempt, transfer it, record how it ended."""
    # Imported here: the transfer loads torch and the model formats, which a pass that runs
    # no job never needs (``migrator tick`` with nothing to do starts faster without them).
    from migrator.pipeline.execution import give_back, load_request, mark_started, settle
    from migrator.pipeline.transfer_job import perform_transfer

    try:
        request = load_request(ctx, job_id)
        mark_started(ctx, job_id)
    except LeaseLostError as exc:
        return JobOutcome(job_id, OutcomeStatus.LEASE_LOST, str(exc))
    except Exception as exc:
        reason = outage_reason(exc)
        if reason is None:
            raise
        return give_back(ctx, job_id, reason)
    work = partial(
        perform_transfer,
        ctx.settings,
        ctx.registry,
        ctx.workspace,
        request,
        before_publish=partial(leases.check, job_id),
    )
    return settle(ctx, request, work, started=time.perf_counter())
