"""Service commands: ``tick`` (one pass), ``run`` (the daemon), ``plan`` (dry run), ``health``."""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from migrator.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    JSON_OPTION,
    WIDE_OPTION,
    emit_json,
    err,
    fail,
    fmt_atc,
    guarded,
    out,
    state,
)
from migrator.cli.progress import PassProgress
from migrator.cli.tables import Column, print_table

if TYPE_CHECKING:
    from db import TransferJob
    from migrator.pipeline import Context, TickReport
    from migrator.settings import Settings

__all__ = [
    "health_command",
    "job_row",
    "plan_command",
    "print_job_rows",
    "run_command",
    "tick_command",
]

log = logging.getLogger(__name__)


def job_row(job: TransferJob, detail: str | None = None) -> dict[str, object]:
    """How a job shows in pass reports: decision, status, the new version (or why not)."""
    from migrator.documents import job_document

    doc = job_document(job)
    return {
        "job": doc["id"],
        "adapter": doc["adapter"],
        "source_base": doc["source_base"],
        "target_base": doc["target_base"],
        "atc": doc["atc"],
        "decision": doc["decision"],
        "decided_by": doc["decided_by"],
        "policy_decision": doc["policy_decision"],
        "status": doc["status"],
        "new_version": doc["result"],
        "reason": detail or doc["policy_reason"],
    }


def _rows(ctx: Context, report: TickReport) -> list[dict[str, object]]:
    """One row per job planned or executed in the pass."""
    from db import get_job, session_scope
    from migrator.pipeline.executor import OutcomeStatus

    results = {o.job_id: o for o in report.outcomes}
    rows: list[dict[str, object]] = []
    ids = [p.job_id for p in report.planned if p.job_id is not None]
    ids += [i for i in results if i not in ids]
    if report.dry_run:
        for p in report.planned:
            rows.append(
                {
                    "job": None,
                    "adapter": p.adapter,
                    "source_base": p.source_base,
                    "target_base": p.target_base,
                    "atc": p.atc,
                    "decision": p.decision,
                    "decided_by": "policy",
                    "policy_decision": p.decision,
                    "status": "would be " + p.decision,
                    "new_version": None,
                    "reason": p.reason,
                }
            )
        return rows
    with session_scope(ctx.sessions) as session:
        for job_id in ids:
            outcome = results.get(job_id)
            succeeded = outcome is not None and outcome.status is OutcomeStatus.SUCCEEDED
            detail = outcome.detail if outcome and not succeeded else None
            rows.append(job_row(get_job(job_id, session=session), detail))
    return rows


PASS_COLUMNS = (
    Column("JOB", justify="right"),
    Column("ADAPTER", squeeze=True),
    Column("TARGET", squeeze=True),
    Column("ATC", justify="right"),
    Column("POLICY SAID"),
    Column("STATUS"),
    Column("NEW VERSION", squeeze=True),
    Column("SOURCE BASE", wide_only=True),
    Column("DECIDED BY", wide_only=True),
    Column("REASON", wide_only=True),
)


def print_job_rows(rows: list[dict[str, object]], *, title: str, wide: bool = False) -> None:
    """The table of pass reports (``tick``, ``plan``, the demo): the job's state now, beside
    what the policy said."""
    print_table(
        out,
        PASS_COLUMNS,
        [
            [
                r["job"],
                r["adapter"],
                r["target_base"],
                fmt_atc(r["atc"]),
                r["policy_decision"],
                r["status"],
                r["new_version"],
                r["source_base"],
                r["decided_by"],
                r["reason"],
            ]
            for r in rows
        ],
        wide=wide,
        title=title,
    )


def waiting_for_approval(ctx: Context) -> int:
    """How many transfers wait for an admin."""
    from db import pending_approvals, session_scope

    with session_scope(ctx.sessions) as session:
        return len(pending_approvals(session=session))


def print_report(
    rows: list[dict[str, object]],
    report: TickReport,
    *,
    title: str,
    waiting: int = 0,
    wide: bool = False,
) -> None:
    if rows:
        print_job_rows(rows, title=title, wide=wide)
    for source, target in report.deprecated:
        out.print(f"{source} deprecated: superseded by {target}", highlight=False)
    for problem in report.problems:
        err.print(f"[yellow]warning:[/] {problem}", highlight=False)
    if waiting:
        out.print(
            f"{'nothing new to do; ' if not rows else ''}{waiting} transfer"
            f"{' waits' if waiting == 1 else 's wait'} for approval: see `migrator approvals list`",
            highlight=False,
        )
    elif not rows:
        out.print("nothing to do: no adapter is stranded on a deprecated base")


def _context(settings: Settings) -> Context:
    from migrator.database import prepare_database
    from migrator.wiring import build_context

    prepare_database(settings.database_url.get_secret_value())
    return build_context(settings)


def _document(rows: list[dict[str, object]], report: TickReport, waiting: int) -> dict[str, object]:
    return {
        "dry_run": report.dry_run,
        "bases": report.bases,
        "adapters": report.adapters,
        "deprecated": [{"base": s, "superseded_by": t} for s, t in report.deprecated],
        "assessments": report.assessments,
        "jobs": rows,
        "problems": report.problems,
        "duplicates": [{"version": d, "duplicate_of": k} for d, k in report.duplicates],
        "unavailable": report.unavailable,
        "waiting_for_approval": waiting,
        "listing": report.listing,
    }


def _run_pass(ctx: Context, *, dry_run: bool, as_json: bool) -> TickReport:
    """One pass, with progress on a terminal (quiet in JSON mode and in logs)."""
    from migrator.pipeline import run_once

    with PassProgress.shown(err, enabled=not as_json) as progress:
        if progress is not None:
            ctx.on_progress = progress.say
            ctx.on_count = progress.count
            ctx.workspace.progress = lambda done, total, name: progress.count(
                "factorizing", done, total, name
            )
        elif not as_json:
            ctx.on_progress = lambda message: err.print(f"[dim]{message}[/]", highlight=False)
        return run_once(ctx, dry_run=dry_run)


@guarded
def tick_command(as_json: bool = JSON_OPTION, wide: bool = WIDE_OPTION) -> None:
    """Run one pass (discover what changed, assess, plan, transfer, register), then exit."""
    settings = state.settings()
    ctx = _context(settings)
    report = _run_pass(ctx, dry_run=False, as_json=as_json)
    rows = _rows(ctx, report)
    waiting = waiting_for_approval(ctx)
    if as_json:
        emit_json(_document(rows, report, waiting))
    else:
        print_report(rows, report, title="migration pass", waiting=waiting, wide=wide)
    from migrator.pipeline.executor import FAILURES

    if report.unavailable:
        fail(f"{report.unavailable}; the pass ended early, no job spent an attempt on it")
    if any(o.status in FAILURES for o in report.outcomes):
        raise typer.Exit(EXIT_FAILED)


@guarded
def plan_command(as_json: bool = JSON_OPTION, wide: bool = WIDE_OPTION) -> None:
    """Dry run: what a pass would plan, with ATC and policy decision; writes nothing.

    Only the factorization cache may fill (it is a cache).
    """
    settings = state.settings()
    ctx = _context(settings)
    report = _run_pass(ctx, dry_run=True, as_json=as_json)
    rows = _rows(ctx, report)
    waiting = waiting_for_approval(ctx)
    if as_json:
        emit_json(_document(rows, report, waiting))
    else:
        title = "plan (dry run: nothing written)"
        print_report(rows, report, title=title, waiting=waiting, wide=wide)
        for r in rows:
            out.print(f"{r['adapter']} -> {r['target_base']}: {r['reason']}", highlight=False)


def _heartbeat_file(settings: Settings) -> Path:
    return settings.data_dir / "heartbeat.json"


def _release_held(ctx: Context) -> None:
    from db import JobStatus, LeaseLostError, list_jobs, release, session_scope

    worker = ctx.settings.worker_id
    with session_scope(ctx.sessions) as session:
        held = [
            j.id
            for j in list_jobs(session=session, statuses=[JobStatus.RUNNING])
            if j.lease_owner == worker
        ]
    for job_id in held:
        try:
            with session_scope(ctx.sessions) as session:
                release(job_id, worker, session=session)
            log.warning("released job %d", job_id)
        except LeaseLostError:
            pass


@guarded
def run_command() -> None:
    """Run the daemon: a pass every poll_interval_s (earlier on webhook deliveries).

    Stops on SIGTERM/SIGINT after the job in hand; a second signal releases its lease at once.
    """
    from migrator.daemon import Daemon, StopToken
    from migrator.database import prepare_database, wait_for_database

    settings = state.settings()
    stop = StopToken()
    try:
        prepare_database(settings.database_url.get_secret_value())
    except Exception as exc:  # not at head: refuse at once; unreachable: wait for it
        from sqlalchemy.exc import OperationalError

        if not isinstance(exc, OperationalError):
            raise
        if not wait_for_database(settings.database_url.get_secret_value(), stop):
            return
    from migrator.pipeline import run_once
    from migrator.wiring import build_context

    ctx = build_context(settings)
    heartbeat = _heartbeat_file(settings)
    heartbeat.parent.mkdir(parents=True, exist_ok=True)

    def tick(token: StopToken) -> str:
        ctx.stop = token
        last = "failed"
        try:
            report = run_once(ctx)
            last = f"ended early: {report.unavailable}" if report.unavailable else "ok"
            return str(report)
        finally:
            beat = {"at": time.time(), "worker": settings.worker_id, "pass": last}
            heartbeat.write_text(json.dumps(beat))

    daemon = Daemon(tick, settings.poll_interval_s, on_forced_stop=lambda: _release_held(ctx))
    stop = daemon.stop
    receiver = None
    if settings.webhook_enabled:
        from migrator.webhook import (
            WebhookLimits,
            WebhookReceiver,
            database_deliveries,
            database_marks,
        )

        if settings.webhook_secret is None:
            fail("webhook_enabled needs webhook_secret (MIGRATOR_WEBHOOK_SECRET)", EXIT_BAD_INPUT)
        limits = WebhookLimits.from_settings(settings)
        receiver = WebhookReceiver(
            settings.webhook_host,
            settings.webhook_port,
            settings.webhook_secret.get_secret_value(),
            daemon.poll_now,
            limits=limits,
            deliveries=database_deliveries(ctx.sessions, limits.timestamp_window_s),
            marks=database_marks(ctx.sessions),
        )
        receiver.start()
    try:
        daemon.run_forever()
    finally:
        if receiver is not None:
            receiver.stop()
        _release_held(ctx)


@guarded
def health_command(
    max_age_s: float | None = typer.Option(
        None, "--max-age", help="Oldest acceptable heartbeat (default: 3 poll intervals + 5 min)."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Exit 0 when the daemon on this host finished a pass recently (for liveness probes).

    Also says how the last pass ended and counts jobs per status, jobs failed for good and
    duplicate versions marked (these do not change the exit code).
    """
    settings = state.settings()
    path = _heartbeat_file(settings)
    limit = max_age_s if max_age_s is not None else 3 * settings.poll_interval_s + 300
    if not path.exists():
        doc = {"healthy": False, "reason": f"no heartbeat at {path} yet"}
    else:
        beat = json.loads(path.read_text())
        age = time.time() - float(beat["at"])
        doc = {
            "healthy": age <= limit,
            "age_s": round(age, 1),
            "max_age_s": limit,
            "worker": beat.get("worker"),
            "last_pass": datetime.fromtimestamp(float(beat["at"]), UTC).isoformat(),
            "last_pass_result": beat.get("pass"),
        }
    from migrator.database import health_counts

    doc.update(health_counts(settings.database_url.get_secret_value()))
    if as_json:
        emit_json(doc)
    elif "reason" in doc:
        out.print(f"unhealthy: {doc['reason']}", highlight=False)
    else:
        out.print(
            f"{'healthy' if doc['healthy'] else 'unhealthy'}: last pass {doc['age_s']:.0f}s ago "
            f"({doc['last_pass']}) by {doc['worker']}; the limit is {doc['max_age_s']:.0f}s",
            highlight=False,
        )
    if not doc["healthy"]:
        raise typer.Exit(EXIT_FAILED)
