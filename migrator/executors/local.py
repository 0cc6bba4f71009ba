"""The default executor: claimed jobs run one after the other in this process."""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import partial

from migrator.pipeline.context import Context
from migrator.pipeline.execution import load_request, settle
from migrator.pipeline.executor import JobOutcome, OutcomeStatus, release_jobs
from migrator.pipeline.lease_keeper import LeaseKeeper
from migrator.pipeline.transfer_job import perform_transfer
from migrator.registry import ModelVersionInfo

__all__ = ["LocalExecutor"]


class LocalExecutor:
    """Runs claimed jobs one after the other in this process.

    Every claimed job's lease is kept alive from the start of the batch, so a job queued behind
    a long one is not reclaimed by another replica while it waits; a stop releases the jobs not
    yet started.
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
                if ctx.stop.requested:
                    for rest in held[i:]:
                        leases.drop(rest)
                    outcomes.extend(release_jobs(ctx, held[i:]))
                    break
                request = load_request(ctx, job_id)
                work = partial(
                    perform_transfer,
                    ctx.settings,
                    ctx.registry,
                    ctx.workspace,
                    request,
                    before_publish=partial(leases.check, job_id),
                )
                outcomes.append(settle(ctx, request, work, started=time.perf_counter()))
                leases.drop(job_id)
        return outcomes

    def prefetch(self, ctx: Context, bases: Sequence[ModelVersionInfo]) -> None:
        """Nothing ahead of time: the assessment factorizes in this process."""
