"""Admin commands: approvals and jobs. Every change writes an audit row (who, when, why).

Lists are compact (one line per job, fitted to the terminal; ``--wide`` for every column),
``jobs show`` has the detail. Read-only commands create no database.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import typer

from migrator.cli.common import (
    EXIT_BAD_INPUT,
    JSON_OPTION,
    WIDE_OPTION,
    actor,
    decisions_table,
    emit_json,
    fail,
    fields,
    fmt_atc,
    guarded,
    out,
)
from migrator.cli.help import App
from migrator.cli.jobdb import JobDb, open_job_db
from migrator.cli.tables import Column, print_table

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from db import TransferJob

__all__ = ["approvals_app", "jobs_app"]

approvals_app = App(
    help="Transfers waiting for an admin: list, approve, reject.", no_args_is_help=True
)
jobs_app = App(help="Transfer jobs: list, show, retry, force.", no_args_is_help=True)

BY_OPTION = typer.Option(None, "--by", help="Who acts (default: the OS user).")

JOB_COLUMNS = (
    Column("ID", justify="right"),
    Column("STATUS"),
    Column("ADAPTER", squeeze=True),
    Column("TARGET", squeeze=True),
    Column("ATC", justify="right"),
    Column("RESULT", squeeze=True),
    Column("SOURCE BASE", wide_only=True),
    Column("DECISION", wide_only=True),
    Column("POLICY SAID", wide_only=True),
    Column("ATTEMPTS", wide_only=True),
    Column("REASON / ERROR", wide_only=True),
)


def _decision_text(doc: dict[str, Any]) -> str | None:
    """``approved by alice`` (None before any decision)."""
    if doc["decision"] is None:
        return None
    return f"{doc['decision']} by {doc['decided_by']}"


def _jobs_table(docs: list[dict[str, Any]], *, wide: bool) -> None:
    print_table(
        out,
        JOB_COLUMNS,
        [
            (
                d["id"],
                d["status"],
                d["adapter"],
                d["target_base"],
                fmt_atc(d["atc"]),
                d["result"],
                d["source_base"],
                _decision_text(d),
                d["policy_decision"],
                f"{d['attempts']}/{d['max_attempts']}",
                d["last_error"] or d["policy_reason"],
            )
            for d in docs
        ],
        wide=wide,
    )


def _job(job_id: int, db: JobDb, session: Session, *, for_update: bool = False) -> TransferJob:
    """The job, or exit 2 naming the database looked in and the ids it holds."""
    from sqlalchemy import func, select

    from db import JobNotFoundError, TransferJob, get_job

    try:
        return get_job(job_id, session=session, for_update=for_update)
    except JobNotFoundError:
        low, high = session.execute(
            select(func.min(TransferJob.id), func.max(TransferJob.id))
        ).one()
        known = f"it holds jobs {low} to {high}" if low is not None else "it holds no job yet"
        fail(f"no transfer job with id {job_id} in {db.where}: {known}", EXIT_BAD_INPUT)


def _act(
    job_id: int,
    action: Callable[..., TransferJob],
    *,
    by: str | None,
    reason: str | None,
    as_json: bool,
    verb: str,
) -> None:
    from db import session_scope
    from migrator.documents import job_document

    db = open_job_db(read_only=False)
    with session_scope(db.sessions) as session:
        _job(job_id, db, session)
        job = action(job_id, actor(by), reason, session=session)
        doc: dict[str, Any] = job_document(job)
    if as_json:
        emit_json(doc)
    else:
        out.print(
            f"job {job_id} {verb} by {actor(by)}: now {doc['status']}"
            + (" (it runs on the next pass)" if doc["status"] == "approved" else ""),
            highlight=False,
        )


@approvals_app.command("list")
@guarded
def approvals_list(as_json: bool = JSON_OPTION, wide: bool = WIDE_OPTION) -> None:
    """Transfers waiting for approval (ATC between auto_approve_atc and max_atc)."""
    from db import pending_approvals, session_scope
    from migrator.documents import job_document

    db = open_job_db(read_only=True)
    with session_scope(db.sessions) as session:
        docs = [job_document(j) for j in pending_approvals(session=session)]
    if as_json:
        emit_json(docs)
    elif docs:
        _jobs_table(docs, wide=wide)
    else:
        out.print(f"no transfer is waiting for approval in {db.where}", highlight=False)


@approvals_app.command("approve")
@guarded
def approvals_approve(
    job_id: int = typer.Argument(..., help="Job id (see `migrator approvals list`)."),
    by: str | None = BY_OPTION,
    reason: str | None = typer.Option(None, "--reason", help="Why (kept in the audit trail)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Approve a pending transfer; it runs on the next pass. Approving it again changes nothing."""
    from db import approve, session_scope
    from db.jobs import ALREADY_APPROVED
    from migrator.documents import job_document

    db = open_job_db(read_only=False)
    with session_scope(db.sessions) as session:
        job = _job(job_id, db, session)
        if job.status in ALREADY_APPROVED:
            doc = job_document(job)
            if as_json:
                emit_json(doc)
            else:
                out.print(
                    f"job {job_id} is approved already ({_decision_text(doc)}, now "
                    f"{doc['status']}): nothing changed",
                    highlight=False,
                )
            return
    _act(job_id, approve, by=by, reason=reason, as_json=as_json, verb="approved")


@approvals_app.command("reject")
@guarded
def approvals_reject(
    job_id: int = typer.Argument(..., help="Job id."),
    reason: str = typer.Option(..., "--reason", help="Why (required; kept in the audit trail)."),
    by: str | None = BY_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Reject a pending transfer."""
    from db import reject

    if not reason.strip():
        fail("a rejection needs a reason (--reason)", EXIT_BAD_INPUT)
    _act(job_id, reject, by=by, reason=reason, as_json=as_json, verb="rejected")


@jobs_app.command("list")
@guarded
def jobs_list(
    status: list[str] = typer.Option(
        None, "--status", "-s", help="Only these statuses (repeatable)."
    ),
    limit: int | None = typer.Option(None, "--limit", help="At most this many."),
    as_json: bool = JSON_OPTION,
    wide: bool = WIDE_OPTION,
) -> None:
    """Transfer jobs, oldest first (`migrator jobs show ID` for one job's detail)."""
    from db import JobStatus, list_jobs, session_scope
    from migrator.documents import job_document

    try:
        statuses = [JobStatus(s) for s in status] if status else None
    except ValueError:
        fail(f"--status must be one of {', '.join(s.value for s in JobStatus)}", EXIT_BAD_INPUT)
    db = open_job_db(read_only=True)
    with session_scope(db.sessions) as session:
        jobs = list_jobs(session=session, statuses=statuses, limit=limit)
        docs = [job_document(j) for j in jobs]
    if as_json:
        emit_json(docs)
    elif docs:
        _jobs_table(docs, wide=wide)
    else:
        out.print(f"no transfer job in {db.where}", highlight=False)


def _audit_document(job_id: int, session: Session) -> list[dict[str, Any]]:
    from db import audit_trail

    return [
        {
            "action": e.action.value,
            "actor": e.actor,
            "reason": e.reason,
            "from": e.from_status.value,
            "to": e.to_status.value,
            "at": e.at,
        }
        for e in audit_trail(job_id, session=session)
    ]


def _modules_document(job: TransferJob) -> list[dict[str, Any]]:
    """The module decisions the job was planned (and approved) with."""
    from migrator.documents import decision_document, decision_from_row

    if job.assessment is None:
        return []
    combine = str(job.assessment.parameters.get("combine", "mean"))
    return [decision_document(decision_from_row(p, combine)) for p in job.assessment.module_pairs]


def _print_job(doc: dict[str, Any], *, wide: bool) -> None:
    counts = doc["module_counts"]
    fields(
        f"job {doc['id']}",
        [
            ("status", doc["status"]),
            ("decision", _decision_text(doc)),
            ("policy said", f"{doc['policy_decision']}: {doc['policy_reason']}"),
            ("adapter", doc["adapter"]),
            ("source base", doc["source_base"]),
            ("target base", doc["target_base"]),
            ("ATC", fmt_atc(doc["atc"])),
            ("mode", doc["mode"]),
            ("attempts", f"{doc['attempts']}/{doc['max_attempts']}"),
            ("next attempt", doc["next_attempt_at"]),
            ("last error", doc["last_error"]),
            (
                "lease",
                doc["lease_owner"] and f"{doc['lease_owner']} until {doc['lease_expires_at']}",
            ),
            ("result", doc["result"]),
            ("migration run", doc["mlflow_run_id"]),
            ("created", doc["created_at"]),
            ("updated", doc["updated_at"]),
            *(counts.rows() if counts is not None else []),
        ],
    )
    out.print()
    out.print("[bold]audit trail[/]")
    for a in doc["audit"]:
        line = f"  {str(a['at'])[:19]}  {a['action']} by {a['actor']}: {a['from']} -> {a['to']}"
        out.print(
            line + (f" ({a['reason']})" if a["reason"] else ""), highlight=False, markup=False
        )
    if doc["modules"]:
        out.print()
        decisions_table("module decisions", doc["modules"], wide=wide)


@jobs_app.command("show")
@guarded
def jobs_show(
    job_id: int = typer.Argument(..., help="Job id."),
    as_json: bool = JSON_OPTION,
    wide: bool = WIDE_OPTION,
) -> None:
    """One job: its state and decision, what the policy said, attempts, result, module
    decisions and audit trail."""
    from db import session_scope
    from migrator.documents import ModuleCounts, decision_from_row, job_document

    db = open_job_db(read_only=True)
    with session_scope(db.sessions) as session:
        job = _job(job_id, db, session)
        counts = None
        if job.assessment is not None:
            combine = str(job.assessment.parameters.get("combine", "mean"))
            decisions = [decision_from_row(p, combine) for p in job.assessment.module_pairs]
            counts = ModuleCounts.of_decisions(decisions)
        doc = job_document(
            job, audit=_audit_document(job_id, session), modules=_modules_document(job)
        )
    if as_json:
        emit_json({**doc, "module_counts": counts and counts.document()})
    else:
        _print_job({**doc, "module_counts": counts}, wide=wide)


@jobs_app.command("retry")
@guarded
def jobs_retry(
    job_id: int = typer.Argument(..., help="Job id of a failed job."),
    by: str | None = BY_OPTION,
    reason: str | None = typer.Option(None, "--reason", help="Why (kept in the audit trail)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Retry a failed job (its attempts start again)."""
    from db import retry

    _act(job_id, retry, by=by, reason=reason, as_json=as_json, verb="retried")


@jobs_app.command("force")
@guarded
def jobs_force(
    job_id: int = typer.Argument(..., help="Job id of a skipped or rejected job."),
    reason: str = typer.Option(..., "--reason", help="Why (required; kept in the audit trail)."),
    by: str | None = BY_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Force a skipped (ATC above max_atc) or rejected job to run."""
    from db import force

    if not reason.strip():
        fail("forcing needs a reason (--reason)", EXIT_BAD_INPUT)
    _act(job_id, force, by=by, reason=reason, as_json=as_json, verb="forced")
