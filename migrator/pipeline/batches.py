"""The execution half of a pass: claim approved jobs in batches and hand them to the executor,
until none is left, a stop is asked, or the breaker trips (the registry or the job database
unreachable: :mod:`migrator.pipeline.breaker`).

Before claiming, the pass gives back jobs an earlier pass of this process could not release
(the database was away), and fails for good the jobs whose workers died on their last attempt,
so that they are reported (logged at ERROR, and ``migrator tick`` exits 1).
"""

from __future__ import annotations

from db import JobStatus, claim, count_by_status, fail_exhausted_leases, session_scope
from migrator.pipeline.breaker import outage_reason
from migrator.pipeline.context import Context, crash_point
from migrator.pipeline.executor import JobOutcome, OutcomeStatus, release_jobs

__all__ = ["run_batches"]


def _tripped(ctx: Context, exc: Exception) -> bool:
    """Trip the breaker if ``exc`` is an outage; False for any other error."""
    reason = outage_reason(exc)
    if reason is None:
        return False
    ctx.breaker.trip(reason)
    return True


def _fail_exhausted(ctx: Context) -> list[JobOutcome]:
    with session_scope(ctx.sessions) as session:
        return [
            JobOutcome(job.id, OutcomeStatus.FAILED, job.last_error or "lease expired")
            for job in fail_exhausted_leases(session=session)
        ]


def _claim_batch(ctx: Context) -> list[int]:
    s = ctx.settings
    with session_scope(ctx.sessions) as session:
        jobs = claim(s.worker_id, limit=s.claim_batch, lease_seconds=s.lease_s, session=session)
        return [job.id for job in jobs]


def run_batches(ctx: Context) -> list[JobOutcome]:
    """Claim and execute batches of approved jobs; one outcome per job touched.

    Raises:
        Whatever is not an outage (a bug); an outage trips ``ctx.breaker`` instead, and the
        jobs in hand are given back unspent.
    """
    outcomes: list[JobOutcome] = []
    try:
        leftovers = ctx.breaker.take_unreleased()
        if leftovers:
            outcomes += release_jobs(ctx, leftovers, "given back after an outage")
        if not ctx.breaker.tripped:
            outcomes += _fail_exhausted(ctx)
    except Exception as exc:
        if not _tripped(ctx, exc):
            raise
    runnable, done = _runnable(ctx), 0
    while not (ctx.stop.requested or ctx.breaker.tripped):
        try:
            ids = _claim_batch(ctx)
        except Exception as exc:
            if not _tripped(ctx, exc):
                raise
            break
        if not ids:
            break
        crash_point("after_claim")
        try:
            outcomes += ctx.executor.run(ctx, ids)
        except Exception as exc:
            if not _tripped(ctx, exc):
                raise
            for job_id in ids:  # whichever is still ours is given back by the next pass
                ctx.breaker.keep_unreleased(job_id)
        done += len(ids)
        ctx.count("transferring", done, max(runnable, done))
    return outcomes


def _runnable(ctx: Context) -> int:
    """Approved jobs when execution starts (for progress; 0 when the database is away)."""
    if ctx.breaker.tripped:
        return 0
    try:
        with session_scope(ctx.sessions) as session:
            return count_by_status(session=session)[JobStatus.APPROVED]
    except Exception as exc:
        if not _tripped(ctx, exc):
            raise
        return 0
