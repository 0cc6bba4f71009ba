"""The job-database side of executing a claimed job: read it, keep its lease alive, record how it
ended. The work itself is :func:`migrator.pipeline.transfer_job.perform_transfer`.

Order matters for crash safety: the registry is written before the database, the version is
found again by the job's tags when a job is re-run, and the database is written only while the
lease is ours. A crash anywhere loses nothing (the lease expires and the job is reclaimed) and
duplicates nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from core.errors import InputError
from db import (
    AdapterOrigin,
    BackoffPolicy,
    LeaseLostError,
    complete,
    fail,
    find_base_version,
    get_job,
    get_or_create_adapter_version,
    heartbeat,
    session_scope,
)
from db.enums import AdapterFormat
from db.enums import AdapterLayout as DbLayout
from migrator.pipeline.context import Context
from migrator.pipeline.transfer_job import TransferDone, TransferRequest, perform_transfer
from migrator.registry import VersionRef

__all__ = [
    "JobOutcome",
    "LeaseKeeper",
    "execute_job",
    "load_request",
    "record_failure",
    "record_success",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobOutcome:
    """How one job ended in this process."""

    job_id: int
    status: str  # succeeded | failed | retrying | lease_lost | released
    detail: str
    result_ref: str | None = None


class LeaseKeeper:
    """Renews a job's lease every ``heartbeat_s`` in a background thread until stopped."""

    def __init__(self, ctx: Context, job_id: int) -> None:
        self.ctx = ctx
        self.job_id = job_id
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def renew(self) -> None:
        """Renew now. Raises LeaseLostError when the job is no longer ours."""
        s = self.ctx.settings
        with session_scope(self.ctx.sessions) as session:
            heartbeat(self.job_id, s.worker_id, session=session, lease_seconds=s.lease_s)

    def _run(self) -> None:
        while not self._stop.wait(self.ctx.settings.heartbeat_s):
            try:
                self.renew()
            except LeaseLostError as exc:
                self.lost = str(exc)
                return
            except Exception as exc:  # database briefly away: try again next beat
                log.warning("heartbeat of job %d failed: %s", self.job_id, exc)

    def check(self) -> None:
        """Raise LeaseLostError unless the lease is still ours (renewing it)."""
        if self.lost is None:
            try:
                self.renew()
            except LeaseLostError as exc:
                self.lost = str(exc)
        if self.lost is not None:
            raise LeaseLostError(self.job_id, self.ctx.settings.worker_id, "unknown", None)


def load_request(ctx: Context, job_id: int) -> TransferRequest:
    """What a worker needs of a claimed job."""
    with session_scope(ctx.sessions) as session:
        job = get_job(job_id, session=session)
        approvers = [e.actor for e in job.audit_events if e.to_status.value == "approved"]
        return TransferRequest(
            job_id=job.id,
            adapter=VersionRef(job.adapter_version.name, job.adapter_version.version),
            source=VersionRef(job.source_base.name, job.source_base.version),
            target=VersionRef(job.target_base.name, job.target_base.version),
            mode=job.mode,
            approved_by=approvers[-1] if approvers else "policy",
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
    return JobOutcome(request.job_id, "succeeded", "registered", str(done.version))


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
        status = job.status.value
    retrying = status == "approved"
    log.log(
        logging.WARNING if retrying else logging.ERROR,
        "job %d (%s -> %s) failed%s: %s",
        request.job_id,
        request.adapter,
        request.target,
        "; retrying later" if retrying else "",
        message,
    )
    return JobOutcome(request.job_id, "retrying" if retrying else "failed", message)


def execute_job(ctx: Context, job_id: int) -> JobOutcome:
    """Run a job this worker has claimed, in this process, and record how it ended."""
    request = load_request(ctx, job_id)
    started = time.perf_counter()
    with LeaseKeeper(ctx, job_id) as lease:
        try:
            done = perform_transfer(
                ctx.settings, ctx.registry, ctx.workspace, request, before_publish=lease.check
            )
            lease.check()
            outcome = record_success(ctx, request, done)
        except LeaseLostError as exc:
            log.warning("job %d: lease lost, leaving it to its new owner (%s)", job_id, exc)
            return JobOutcome(job_id, "lease_lost", str(exc))
        except Exception as exc:  # the job fails, the pass goes on
            return record_failure(ctx, request, exc)
    ctx.say(
        f"job {job_id}: {request.adapter} -> {done.version} on {request.target} "
        f"in {time.perf_counter() - started:.1f}s" + (" (found registered)" if done.reused else "")
    )
    return outcome
