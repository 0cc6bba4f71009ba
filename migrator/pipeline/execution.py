"""The job-database side of executing a claimed job: read it with the decisions it was approved
with, record how it ended. The work itself is
:func:`migrator.pipeline.transfer_job.perform_transfer`; executors run it and hand its end to
:func:`settle`.

Order matters for crash safety: the registry is written before the database, the version is
found again by the job's tags when a job is re-run, and the database is written only while the
lease is ours. A crash anywhere loses nothing (the lease expires and the job is reclaimed) and
duplicates nothing.
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
    session_scope,
)
from db.enums import AdapterFormat
from db.enums import AdapterLayout as DbLayout
from migrator.documents import decision_from_row
from migrator.pipeline.context import Context
from migrator.pipeline.executor import JobOutcome, OutcomeStatus
from migrator.pipeline.transfer_job import ApprovedAssessment, TransferDone, TransferRequest
from migrator.registry import VersionRef

__all__ = [
    "approved_assessment",
    "load_request",
    "record_failure",
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
        )


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
        complete(
            request.job_id,
            ctx.settings.worker_id,
            result_adapter_version_id=row.id,
            result_ref=str(done.version),
            mlflow_run_id=done.run_id,
            session=session,
        )
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
        "; retrying later" if retrying else "",
        message,
    )
    status = OutcomeStatus.RETRYING if retrying else OutcomeStatus.FAILED
    return JobOutcome(request.job_id, status, message)


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
    except Exception as exc:  # the job fails, the pass goes on
        try:
            return record_failure(ctx, request, exc)
        except LeaseLostError as lost:
            return JobOutcome(job_id, OutcomeStatus.LEASE_LOST, str(lost))
    try:
        outcome = record_success(ctx, request, done)
    except LeaseLostError as exc:
        log.warning("job %d: lease lost, leaving it to its new owner (%s)", job_id, exc)
        return JobOutcome(job_id, OutcomeStatus.LEASE_LOST, str(exc))
    ctx.say(
        f"job {job_id}: {request.adapter} -> {done.version} on {request.target} "
        f"in {time.perf_counter() - started:.1f}s{where}"
        + (" (found registered)" if done.reused else "")
    )
    return outcome
