"""The job-database side of executing a claimed job: read it with the decisions it was approved
with, record how it ended. The work itself is
:func:`migrator.pipeline.transfer_job.perform_transfer`; executors run it and hand its end to
:func:`settle`.

Order matters for crash safety: the registry is written before the database, the version is
found again by the job's tags when a job is re-run, and the database is written only while the
lease is ours. A crash anywhere loses nothing (the lease expires and the job is reclaimed) and
duplicates nothing.

Attempts: an executor calls :func:`mark_started` right before a job's work (the local
executor) or at its submission (Ray); that spends the attempt. A job whose work ends because the
registry or the database is unreachable is given back with the attempt refunded
(:func:`give_back`) and trips the pass's breaker: an outage is nobody's fault but the service's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from core.errors import InputError
from db import (
    AdapterOrigin,
    BackoffPolicy,
    JobStatus,
    LeaseLostError,
    TransferJob,
    complete,
    fail,
    find_base_version,
    get_job,
    get_or_create_adapter_version,
    hold,
    release,
    session_scope,
    start,
)
from db.enums import AdapterFormat
from db.enums import AdapterLayout as DbLayout
from migrator.documents import decision_from_row
from migrator.pipeline.breaker import outage_reason
from migrator.pipeline.context import Context
from migrator.pipeline.executor import JobOutcome, OutcomeStatus
from migrator.pipeline.transfer_job import (
    ApprovedAssessment,
    TransferDone,
    TransferHeld,
    TransferRequest,
)
from migrator.registry import VersionRef

__all__ = [
    "approved_assessment",
    "give_back",
    "load_request",
    "mark_started",
    "record_failure",
    "record_hold",
    "record_success",
    "settle",
]

log = logging.getLogger(__name__)


def approved_assessment(job: TransferJob) -> ApprovedAssessment | None:
    """The stored assessment of a job, with its decisions and figures (None when deleted)."""
    row = job.assessment
    if row is None:
        return None
    combine = str(row.parameters.get("combine", "mean"))
    return ApprovedAssessment(
        assessment_id=row.id,
        atc=row.atc,
        atc_left=row.atc_left,
        atc_right=row.atc_right,
        parameters=dict(row.parameters),
        decisions=tuple(decision_from_row(p, combine) for p in row.module_pairs),
        figures={f.name: bytes(f.content) for f in row.figures},
        signals=dict(row.signals or {}),
    )


def load_request(ctx: Context, job_id: int) -> TransferRequest:
    """What a worker needs of a claimed job, the decisions it was approved with included."""
    with session_scope(ctx.sessions) as session:
        job = get_job(job_id, session=session)
        approvers = [e.actor for e in job.audit_events if e.to_status is JobStatus.APPROVED]
        return TransferRequest(
            job_id=job.id,
            adapter=VersionRef(job.adapter_version.name, job.adapter_version.version),
            source=VersionRef(job.source_base.name, job.source_base.version),
            target=VersionRef(job.target_base.name, job.target_base.version),
            mode=job.mode,
            approved_by=approvers[-1] if approvers else "policy",
            assessment=approved_assessment(job),
            signals=tuple(job.signals or ()),
        )


def mark_started(ctx: Context, job_id: int) -> None:
    """The job's work begins here: its attempt is spent.

    Raises:
        LeaseLostError: the job moved on to another worker.
    """
    with session_scope(ctx.sessions) as session:
        start(job_id, ctx.settings.worker_id, session=session)


def give_back(ctx: Context, job_id: int, reason: str) -> JobOutcome:
    """An outage ended the job's work: trip the pass's breaker and give the job back with its
    attempt refunded (kept for the next pass when the database itself is away)."""
    ctx.breaker.trip(reason)
    try:
        with session_scope(ctx.sessions) as session:
            release(job_id, ctx.settings.worker_id, session=session)
    except LeaseLostError as exc:
        return JobOutcome(job_id, OutcomeStatus.LEASE_LOST, str(exc))
    except Exception as exc:
        if outage_reason(exc) is None:
            raise
        ctx.breaker.keep_unreleased(job_id)
    log.warning("job %d given back unfinished, no attempt spent: %s", job_id, reason)
    return JobOutcome(job_id, OutcomeStatus.DEFERRED, reason)


def record_success(ctx: Context, request: TransferRequest, done: TransferDone) -> JobOutcome:
    """Record the registered version, the lineage edge and the run; the job succeeds.

    Raises:
        LeaseLostError: the job was reclaimed meanwhile (its new owner records it).
    """
    with session_scope(ctx.sessions) as session:
        target = find_base_version(request.target.name, request.target.version, session=session)
        assert target is not None
        row = get_or_create_adapter_version(
            done.version.name,
            done.version.version,
            base=target,
            format=AdapterFormat(done.format),
            layout=None if done.layout is None else DbLayout(done.layout),
            rank=done.rank,
            origin=AdapterOrigin.TRANSFERRED,
            session=session,
        )
        job = complete(
            request.job_id,
            ctx.settings.worker_id,
            result_adapter_version_id=row.id,
            result_ref=str(done.version),
            mlflow_run_id=done.run_id,
            session=session,
        )
        if done.signals:
            job.signals = [*(job.signals or []), *(dict(x) for x in done.signals)]
    return JobOutcome(request.job_id, OutcomeStatus.SUCCEEDED, "registered", str(done.version))


def record_failure(ctx: Context, request: TransferRequest, exc: BaseException) -> JobOutcome:
    """Fail the job: for good on bad input, else for an automatic retry with backoff."""
    s = ctx.settings
    # Bad content (and a ValueError from the math: a bad request) is not worth retrying.
    retryable = not isinstance(exc, InputError | ValueError)
    message = f"{type(exc).__name__}: {exc}"
    with session_scope(ctx.sessions) as session:
        job = fail(
            request.job_id,
            s.worker_id,
            message,
            retryable=retryable,
            backoff=BackoffPolicy(s.retry_backoff_s, s.retry_backoff_max_s),
            session=session,
        )
        retrying = job.status is JobStatus.APPROVED
    log.log(
        logging.WARNING if retrying else logging.ERROR,
        "job %d (%s -> %s) failed%s: %s",
        request.job_id,
        request.adapter,
        request.target,
        "; retrying later" if retrying else f" for good (`migrator jobs retry {request.job_id}`)",
        message,
    )
    status = OutcomeStatus.RETRYING if retrying else OutcomeStatus.FAILED
    return JobOutcome(request.job_id, status, message)


def record_hold(ctx: Context, request: TransferRequest, held: TransferHeld) -> JobOutcome:
    """The transfer failed a signal: the job waits for an admin, nothing was registered."""
    with session_scope(ctx.sessions) as session:
        hold(
            request.job_id,
            ctx.settings.worker_id,
            held.reason,
            signals=list(held.signals),
            session=session,
        )
    log.warning("job %d (%s -> %s) %s", request.job_id, request.adapter, request.target, held)
    return JobOutcome(request.job_id, OutcomeStatus.HELD, held.reason)


def _settle_failure(ctx: Context, request: TransferRequest, exc: Exception) -> JobOutcome:
    """An outage gives the job back unspent; any other error is the job's failure."""
    reason = outage_reason(exc)
    if reason is not None:
        return give_back(ctx, request.job_id, reason)
    try:
        return record_failure(ctx, request, exc)
    except LeaseLostError as lost:
        return JobOutcome(request.job_id, OutcomeStatus.LEASE_LOST, str(lost))
    except Exception as db_exc:
        reason = outage_reason(db_exc)
        if reason is None:
            raise
        return give_back(ctx, request.job_id, reason)


def settle(
    ctx: Context,
    request: TransferRequest,
    work: Callable[[], TransferDone],
    *,
    started: float,
    where: str = "",
) -> JobOutcome:
    """Run (or collect) a job's work and record how it ended, under the job's lease.

    Args:
        work: performs the transfer, or waits for a remote one; a LeaseLostError from it means
            the job moved on to another worker.
        started: when the work began (``time.perf_counter()``), for the log line.
        where: appended to the log line (`` on Ray``).
    """
    job_id = request.job_id
    try:
        done = work()
    except LeaseLostError as exc:
        log.warning("job %d: lease lost, leaving it to its new owner (%s)", job_id, exc)
        return JobOutcome(job_id, OutcomeStatus.LEASE_LOST, str(exc))
    except TransferHeld as held:  # the transfer failed a signal: an admin decides
        try:
            return record_hold(ctx, request, held)
        except LeaseLostError as lost:
            return JobOutcome(job_id, OutcomeStatus.LEASE_LOST, str(lost))
    except Exception as exc:  # the job fails, the pass goes on (unless it is an outage)
        return _settle_failure(ctx, request, exc)
    try:
        outcome = record_success(ctx, request, done)
    except LeaseLostError as exc:
        log.warning("job %d: lease lost, leaving it to its new owner (%s)", job_id, exc)
        return JobOutcome(job_id, OutcomeStatus.LEASE_LOST, str(exc))
    except Exception as exc:  # registered, not recorded: the next run finds the version
        reason = outage_reason(exc)
        if reason is None:
            raise
        return give_back(ctx, job_id, reason)
    ctx.say(
        f"job {job_id}: {request.adapter} -> {done.version} on {request.target} "
        f"in {time.perf_counter() - started:.1f}s{where}"
        + (" (found registered)" if done.reused else "")
    )
    return outcome
