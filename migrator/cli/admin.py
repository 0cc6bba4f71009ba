"""Admin commands: approvals, jobs, lineage. Every change writes an audit row (who, when, why)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import typer
from rich.tree import Tree
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db import (
    AdapterVersion,
    JobStatus,
    Lineage,
    TransferJob,
    ancestors,
    approve,
    audit_trail,
    descendants,
    find_adapter_version,
    force,
    get_job,
    list_jobs,
    make_engine,
    make_session_factory,
    pending_approvals,
    reject,
    retry,
    session_scope,
)
from migrator.cli.common import (
    EXIT_BAD_INPUT,
    actor,
    decisions_table,
    emit_json,
    fail,
    fmt_atc,
    guarded,
    out,
    state,
    table,
)
from migrator.database import prepare_database
from migrator.documents import decision_document, decision_from_row, job_document
from migrator.registry import VersionRef

__all__ = ["approvals_app", "jobs_app", "lineage_command"]

approvals_app = typer.Typer(
    help="Transfers waiting for an admin: list, approve, reject.", no_args_is_help=True
)
jobs_app = typer.Typer(help="Transfer jobs: list, show, retry, force.", no_args_is_help=True)

JSON_OPTION = typer.Option(False, "--json", help="Print one JSON document.")
BY_OPTION = typer.Option(None, "--by", help="Who acts (default: the OS user).")


@dataclass
class _Db:
    sessions: sessionmaker[Session]


def _sessions() -> _Db:
    """The job database (admin commands need neither the registry nor the math)."""
    settings = state.settings()
    prepare_database(settings.database_url.get_secret_value())
    return _Db(make_session_factory(make_engine(settings.database_url.get_secret_value())))


def _jobs_table(title: str, jobs: list[TransferJob]) -> None:
    table(
        title,
        [
            "id",
            "status",
            "adapter",
            "source base",
            "target base",
            "ATC",
            "attempts",
            "result / reason",
        ],
        [
            [
                j.id,
                j.status.value,
                j.adapter_version.ref,
                j.source_base.ref,
                j.target_base.ref,
                fmt_atc(j.atc),
                f"{j.attempts}/{j.max_attempts}",
                j.result_ref or j.last_error or j.policy_reason or "",
            ]
            for j in jobs
        ],
    )


def _act(
    job_id: int,
    action: Callable[..., TransferJob],
    *,
    by: str | None,
    reason: str | None,
    as_json: bool,
    verb: str,
) -> None:
    ctx = _sessions()
    with session_scope(ctx.sessions) as session:
        job = action(job_id, actor(by), reason, session=session)
        doc: dict[str, Any] = job_document(job)
    if as_json:
        emit_json(doc)
    else:
        out.print(
            f"job {job_id} {verb} by {actor(by)}: now {doc['status']}"
            + (" (it runs on the next pass)" if doc["status"] == "approved" else "")
        )


@approvals_app.command("list")
@guarded
def approvals_list(as_json: bool = JSON_OPTION) -> None:
    """Transfers waiting for approval (ATC between auto_approve_atc and max_atc)."""
    ctx = _sessions()
    with session_scope(ctx.sessions) as session:
        jobs = list(pending_approvals(session=session))
        docs = [job_document(j) for j in jobs]
        if not as_json:
            _jobs_table("waiting for approval", jobs)
            if not jobs:
                out.print("no transfer is waiting for approval")
    if as_json:
        emit_json(docs)


@approvals_app.command("approve")
@guarded
def approvals_approve(
    job_id: int = typer.Argument(..., help="Job id (see `migrator approvals list`)."),
    by: str | None = BY_OPTION,
    reason: str | None = typer.Option(None, "--reason", help="Why (kept in the audit trail)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Approve a pending transfer; it runs on the next pass."""
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
) -> None:
    """Transfer jobs, oldest first."""
    try:
        statuses = [JobStatus(s) for s in status] if status else None
    except ValueError:
        fail(f"--status must be one of {', '.join(s.value for s in JobStatus)}", EXIT_BAD_INPUT)
    ctx = _sessions()
    with session_scope(ctx.sessions) as session:
        jobs = list(list_jobs(session=session, statuses=statuses, limit=limit))
        docs = [job_document(j) for j in jobs]
        if not as_json:
            _jobs_table("jobs", jobs)
    if as_json:
        emit_json(docs)


def _audit_document(job_id: int, session: Session) -> list[dict[str, Any]]:
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
    if job.assessment is None:
        return []
    combine = str(job.assessment.parameters.get("combine", "mean"))
    return [decision_document(decision_from_row(p, combine)) for p in job.assessment.module_pairs]


def _print_job(job_id: int, doc: dict[str, Any]) -> None:
    table(
        f"job {job_id}",
        ["field", "value"],
        [[k, v] for k, v in doc.items() if k not in ("audit", "modules")],
    )
    table(
        "audit trail",
        ["at", "action", "actor", "from -> to", "reason"],
        [
            [a["at"], a["action"], a["actor"], f"{a['from']} -> {a['to']}", a["reason"] or ""]
            for a in doc["audit"]
        ],
    )
    if doc["modules"]:
        decisions_table("module decisions", doc["modules"])


@jobs_app.command("show")
@guarded
def jobs_show(
    job_id: int = typer.Argument(..., help="Job id."), as_json: bool = JSON_OPTION
) -> None:
    """One job: its decision, attempts, result, module decisions and audit trail."""
    ctx = _sessions()
    with session_scope(ctx.sessions) as session:
        job = get_job(job_id, session=session)
        doc = job_document(
            job, audit=_audit_document(job_id, session), modules=_modules_document(job)
        )
    if as_json:
        emit_json(doc)
    else:
        _print_job(job_id, doc)


@jobs_app.command("retry")
@guarded
def jobs_retry(
    job_id: int = typer.Argument(..., help="Job id of a failed job."),
    by: str | None = BY_OPTION,
    reason: str | None = typer.Option(None, "--reason", help="Why (kept in the audit trail)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Retry a failed job (its attempts start again)."""
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
    if not reason.strip():
        fail("forcing needs a reason (--reason)", EXIT_BAD_INPUT)
    _act(job_id, force, by=by, reason=reason, as_json=as_json, verb="forced")


def _versions_of(name: str, session: Session) -> list[AdapterVersion]:
    rows = session.scalars(select(AdapterVersion).where(AdapterVersion.name == name)).all()
    return sorted(rows, key=lambda a: int(a.version) if a.version.isdigit() else 0)


def _parent_of(adapter_id: int, session: Session) -> tuple[str, int | None] | None:
    edge = session.scalars(select(Lineage).where(Lineage.child_id == adapter_id)).first()
    return None if edge is None else (edge.parent.ref, edge.job_id)


def _lineage_of_name(name: str, session: Session) -> dict[str, Any] | None:
    versions = _versions_of(name, session)
    if not versions:
        return None
    rows = []
    for v in versions:
        parent = _parent_of(v.id, session)
        rows.append(
            {
                "version": v.ref,
                "base": v.base.ref,
                "origin": v.origin.value,
                "parent": parent and parent[0],
                "job": parent and parent[1],
            }
        )
    return {"name": name, "versions": rows}


def _lineage_of_version(adapter: AdapterVersion, session: Session) -> dict[str, Any]:
    def edges(entries: list[Any]) -> list[dict[str, Any]]:
        return [
            {"version": e.adapter.ref, "base": e.adapter.base.ref, "depth": e.depth}
            for e in entries
        ]

    return {
        "version": adapter.ref,
        "base": adapter.base.ref,
        "origin": adapter.origin.value,
        "ancestors": edges(ancestors(adapter.id, session=session)),
        "descendants": edges(descendants(adapter.id, session=session)),
    }


def _print_lineage(what: str, doc: dict[str, Any]) -> None:
    if "versions" not in doc:
        chain = [*reversed(doc["ancestors"]), {"version": doc["version"], "base": doc["base"]}]
        out.print(" -> ".join(f"{c['version']} ({c['base']})" for c in chain))
        for d in doc["descendants"]:
            out.print(f"{'  ' * int(d['depth'])}└ {d['version']} ({d['base']})")
        return
    children: dict[str | None, list[dict[str, object]]] = {}
    for v in doc["versions"]:
        children.setdefault(v["parent"], []).append(v)
    tree = Tree(f"[bold]{what}[/]")

    def grow(node: Tree, parent: str | None) -> None:
        for v in children.get(parent, []):
            label = f"{v['version']} on {v['base']} ({v['origin']}"
            label += f", job {v['job']})" if v["job"] else ")"
            grow(node.add(label), str(v["version"]))

    grow(tree, None)
    out.print(tree)


@guarded
def lineage_command(
    what: str = typer.Argument(..., help="An adapter registered model NAME, or NAME/VERSION."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Where an adapter version came from and what was made from it (across bases)."""
    ctx = _sessions()
    try:
        ref: VersionRef | None = VersionRef.parse(what)
    except ValueError:
        ref = None
    with session_scope(ctx.sessions) as session:
        adapter = None
        if ref is not None:  # else a name that merely ends in /<digits>
            adapter = find_adapter_version(ref.name, ref.version, session=session)
        doc = (
            _lineage_of_version(adapter, session)
            if adapter is not None
            else _lineage_of_name(what, session)
        )
    if doc is None:
        fail(f"no adapter named {what!r} is known to the migrator", EXIT_BAD_INPUT)
    if as_json:
        emit_json(doc)
    else:
        _print_lineage(what, doc)
