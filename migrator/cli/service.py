"""Service commands: ``tick`` (one pass), ``run`` (the daemon), ``plan`` (dry run), ``health``."""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from db import JobStatus, LeaseLostError, get_job, list_jobs, release, session_scope
from migrator.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    emit_json,
    err,
    fail,
    fmt_atc,
    guarded,
    out,
    state,
    table,
)
from migrator.daemon import Daemon, StopToken
from migrator.database import prepare_database, wait_for_database
from migrator.settings import Settings

if TYPE_CHECKING:
    from db import TransferJob
    from migrator.pipeline import Context, TickReport

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


def print_job_rows(rows: list[dict[str, object]], *, title: str) -> None:
    """The table of pass reports (``tick``, ``plan``, the demo)."""
    table(
        title,
        [
            "job",
            "adapter",
            "source base",
            "target base",
            "ATC",
            "decision",
            "status",
            "new version",
        ],
        [
            [
                r["job"] or "-",
                r["adapter"],
                r["source_base"],
                r["target_base"],
                fmt_atc(r["atc"]),
                r["decision"],
                r["status"],
                r["new_version"] or "-",
            ]  # type: ignore[arg-type]
            for r in rows
        ],
    )


def print_report(rows: list[dict[str, object]], report: TickReport, *, title: str) -> None:
    if rows:
        print_job_rows(rows, title=title)
    for source, target in report.deprecated:
        out.print(f"{source} deprecated: superseded by {target}")
    for problem in report.problems:
        err.print(f"[yellow]warning:[/] {problem}", highlight=False)
    if not rows:
        out.print("nothing to do: no adapter is stranded on a deprecated base")


def _context(settings: Settings) -> Context:
    from migrator.wiring import build_context

    prepare_database(settings.database_url.get_secret_value())
    return build_context(settings)


def _document(rows: list[dict[str, object]], report: TickReport) -> dict[str, object]:
    return {
        "dry_run": report.dry_run,
        "bases": report.bases,
        "adapters": report.adapters,
        "deprecated": [{"base": s, "superseded_by": t} for s, t in report.deprecated],
        "assessments": report.assessments,
        "jobs": rows,
        "problems": report.problems,
    }


@guarded
def tick_command(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Run one full pass (discover, assess, plan, transfer, register), then exit."""
    from migrator.pipeline import run_once

    settings = state.settings()
    ctx = _context(settings)
    if not as_json:
        ctx.on_progress = lambda message: err.print(f"[dim]{message}[/]", highlight=False)
    report = run_once(ctx)
    rows = _rows(ctx, report)
    if as_json:
        emit_json(_document(rows, report))
    else:
        print_report(rows, report, title="migration pass")
    from migrator.pipeline.executor import FAILURES

    if any(o.status in FAILURES for o in report.outcomes):
        raise typer.Exit(EXIT_FAILED)


@guarded
def plan_command(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Dry run: what a pass would plan, with ATC and policy decision; writes nothing.

    Only the factorization cache may fill (it is a cache).
    """
    from migrator.pipeline import run_once

    settings = state.settings()
    ctx = _context(settings)
    report = run_once(ctx, dry_run=True)
    rows = _rows(ctx, report)
    if as_json:
        emit_json(_document(rows, report))
    else:
        print_report(rows, report, title="plan (dry run: nothing written)")
        for r in rows:
            out.print(f"{r['adapter']} -> {r['target_base']}: {r['reason']}")


def _heartbeat_file(settings: Settings) -> Path:
    return settings.data_dir / "heartbeat.json"


def _release_held(ctx: Context) -> None:
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
        try:
            report = run_once(ctx)
            return str(report)
        finally:
            heartbeat.write_text(json.dumps({"at": time.time(), "worker": settings.worker_id}))

    daemon = Daemon(tick, settings.poll_interval_s, on_forced_stop=lambda: _release_held(ctx))
    stop = daemon.stop
    receiver = None
    if settings.webhook_enabled:
        from migrator.webhook import WebhookReceiver

        if settings.webhook_secret is None:
            fail("webhook_enabled needs webhook_secret (MIGRATOR_WEBHOOK_SECRET)", EXIT_BAD_INPUT)
        receiver = WebhookReceiver(
            settings.webhook_host,
            settings.webhook_port,
            settings.webhook_secret.get_secret_value(),
            daemon.poll_now,
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
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Exit 0 when the daemon on this host finished a pass recently (for liveness probes)."""
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
        }
    if as_json:
        emit_json(doc)
    else:
        out.print(("healthy" if doc["healthy"] else "unhealthy") + f": {doc}")
    if not doc["healthy"]:
        raise typer.Exit(EXIT_FAILED)
