"""``run_once``: the one pass that the scheduler, ``migrator tick``, ``migrator plan`` and the
tests all call.

discover base and adapter versions (every one, or those changed since the last pass:
:mod:`migrator.pipeline.watch`) -> apply succession rules and tag predecessors deprecated ->
assess each (source, target) pair once -> plan one job per adapter lineage and target under the
approval policy -> claim and execute approved jobs -> report. Each pass also resolves versions
registered twice (:mod:`migrator.pipeline.reconcile`), and ends early, spending no job's attempt,
when the registry or the job database is unreachable (:mod:`migrator.pipeline.breaker`).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db import (
    AdapterOrigin,
    AdapterVersion,
    BaseStatus,
    apply_policy_decision,
    deprecate_base,
    find_adapter_version,
    find_base_version,
    get_or_create_adapter_version,
    get_or_create_base_version,
    get_or_create_job,
    known_bases,
    known_counts,
    params_hash,
    recorded_adapters,
    session_scope,
    stale_pending_jobs,
)
from migrator.assessment_params import assessment_parameters
from migrator.pipeline.batches import run_batches
from migrator.pipeline.context import Context
from migrator.pipeline.executor import JobOutcome, OutcomeStatus
from migrator.pipeline.planning import PairATC, Planner, Proposal
from migrator.pipeline.publishing import approve_by_alias, publish_pages
from migrator.pipeline.reconcile import reconcile_duplicates
from migrator.pipeline.snapshot import AdapterEntry, Snapshot, parse_refs
from migrator.pipeline.watch import Listing, Watch, begin_watch, read_snapshot, save_watch
from migrator.policy import signals_json
from migrator.registry import ROLE_BASE, Tag, VersionRef

__all__ = ["PlannedJob", "TickReport", "execute_runnable", "run_once"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedJob:
    """A job planned in this pass (or that would be, in a dry run)."""

    job_id: int | None
    adapter: str
    lineage: str
    source_base: str
    target_base: str
    atc: float | None
    decision: str
    reason: str


@dataclass
class TickReport:
    """What one pass saw and did."""

    dry_run: bool
    bases: int = 0
    adapters: int = 0
    deprecated: list[tuple[str, str]] = field(default_factory=list)
    assessments: list[dict[str, object]] = field(default_factory=list)
    planned: list[PlannedJob] = field(default_factory=list)
    outcomes: list[JobOutcome] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    replanned: list[tuple[int, str]] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (marked, kept)
    unavailable: str | None = None  # why the pass ended early (registry or database away)
    alias_approvals: list[tuple[int, str]] = field(default_factory=list)  # (job, alias)
    listing: str = Listing.FULL.value  # what it read of the registry (full, changes, none)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def __str__(self) -> str:
        done: dict[OutcomeStatus, int] = {}
        for outcome in self.outcomes:
            done[outcome.status] = done.get(outcome.status, 0) + 1
        decided: dict[str, int] = {}
        for job in self.planned:
            decided[job.decision] = decided.get(job.decision, 0) + 1
        return (
            f"{self.bases} bases, {self.adapters} adapters; {len(self.deprecated)} deprecated; "
            f"{len(self.assessments)} assessed; planned {decided or 0}; "
            f"jobs {({str(k): v for k, v in done.items()}) or 0}; "
            f"{len(self.problems)} problems; read {self.listing}"
            + (f"; ended early: {self.unavailable}" if self.unavailable else "")
        )


def _weights_digest(ctx: Context, planner: Planner, ref: VersionRef) -> str:
    base = ctx.workspace.base(planner.snapshot.bases[ref])
    h = hashlib.sha256()
    for name in base.selected:
        h.update(f"{name}={base.source.digest(name)};".encode())
    return "sha256:" + h.hexdigest()


def _record_catalog(ctx: Context, snapshot: Snapshot, planner: Planner, session: Session) -> None:
    """Base and adapter versions into the job database (idempotent): the bases read, and the
    adapter versions not recorded yet; a base's usability once it is known."""
    for ref in sorted(snapshot.bases):
        row = get_or_create_base_version(ref.name, ref.version, session=session)
        if row.status is BaseStatus.MISSING:
            row.status = BaseStatus.ACTIVE
        problem = planner.base_problem(ref)
        if row.weights_digest is None and problem is None:
            row.weights_digest = _weights_digest(ctx, planner, ref)
        recorded_problem = None if row.weights_digest is not None else problem
        if row.problem != recorded_problem:
            row.problem = recorded_problem
    for ref in sorted(snapshot.ghost_bases()):
        row = get_or_create_base_version(ref.name, ref.version, session=session)
        if row.weights_digest is None:
            row.status = BaseStatus.MISSING
    names = None if snapshot.complete else {r.name for r in snapshot.adapters}
    recorded = recorded_adapters(names, session=session)
    new = [e for r, e in snapshot.adapters.items() if (r.name, r.version) not in recorded]
    if new:
        _record_adapters(new, session)
    session.flush()


def _origin(entry: AdapterEntry) -> AdapterOrigin:
    return AdapterOrigin.TRANSFERRED if entry.transferred else AdapterOrigin.REGISTERED


def _record_adapters(entries: list[AdapterEntry], session: Session) -> None:
    """New adapter versions, in one flush; one by one when another replica recorded some of
    them meanwhile (a unique-constraint race)."""
    bases = {}
    for ref in {e.base for e in entries if e.base is not None}:
        bases[ref] = find_base_version(ref.name, ref.version, session=session)

    def row(entry: AdapterEntry) -> AdapterVersion:
        assert entry.base is not None and bases[entry.base] is not None
        return AdapterVersion(
            name=entry.ref.name,
            version=entry.ref.version,
            base=bases[entry.base],
            format=entry.format,
            layout=None,
            origin=_origin(entry),
        )

    try:
        with session.begin_nested():
            session.add_all([row(e) for e in entries])
    except IntegrityError:
        for entry in entries:
            assert entry.base is not None
            get_or_create_adapter_version(
                entry.ref.name,
                entry.ref.version,
                base=bases[entry.base],  # type: ignore[arg-type]
                format=entry.format,
                layout=None,
                origin=_origin(entry),
                session=session,
            )


def _superseded_by(snapshot: Snapshot, planner: Planner, ref: VersionRef, info_tag: str) -> str:
    """Every usable base that names ``ref`` as a direct predecessor, with those the tag already
    lists, as ``name/version[,...]`` in a stable order (name, then version number)."""
    found, _ = parse_refs(info_tag)
    found += [
        other
        for other in snapshot.bases
        if ref in snapshot.direct_predecessors(other) and planner.usable(other)
    ]
    return ",".join(str(r) for r in sorted(set(found), key=lambda r: (r.name, int(r.version))))


def _deprecate(
    ctx: Context,
    snapshot: Snapshot,
    planner: Planner,
    successions: dict[VersionRef, list[VersionRef]],
    report: TickReport,
    session: Session | None,
) -> None:
    """Tag (and record) each predecessor of a usable active base as deprecated, superseded by
    every successor (not only the last one seen)."""
    predecessors = {
        ref for target, refs in successions.items() if planner.usable(target) for ref in refs
    }
    for ref in sorted(predecessors, key=lambda r: (r.name, int(r.version))):
        info = snapshot.bases.get(ref)
        if info is None:
            continue
        successors = _superseded_by(snapshot, planner, ref, info.tags.get(Tag.SUPERSEDED_BY, ""))
        tagged = info.tags.get(Tag.DEPRECATED) == "true"
        if not tagged or info.tags.get(Tag.SUPERSEDED_BY) != successors:
            report.deprecated.append((str(ref), successors))
            if session is not None:
                ctx.registry.set_tags(ref, {Tag.DEPRECATED: "true", Tag.SUPERSEDED_BY: successors})
                ctx.say(f"{ref} deprecated: superseded by {successors}")
        if session is not None:
            row = find_base_version(ref.name, ref.version, session=session)
            if row is not None and (
                row.status is not BaseStatus.DEPRECATED or row.superseded_by != successors
            ):
                deprecate_base(row, successors, session=session)


def _apply(ctx: Context, proposal: Proposal, session: Session) -> int | None:
    """Create the proposed job; None when another replica created it meanwhile."""
    s = ctx.settings
    adapter = find_adapter_version(
        proposal.adapter.ref.name, proposal.adapter.ref.version, session=session
    )
    target = find_base_version(proposal.target.name, proposal.target.version, session=session)
    source = find_base_version(
        proposal.source_base.name, proposal.source_base.version, session=session
    )
    assert adapter is not None and target is not None and source is not None
    job, created = get_or_create_job(
        adapter.id,
        target.id,
        source_base_id=source.id,
        assessment_id=proposal.pair.assessment_id,
        atc=proposal.pair.atc,
        mode=s.transfer_mode,
        max_attempts=s.max_attempts,
        session=session,
    )
    if not created:
        return None
    apply_policy_decision(
        job.id,
        proposal.decision,
        reason=proposal.reason,
        atc=proposal.pair.atc,
        signals=signals_json(proposal.signals),
        session=session,
    )
    return job.id


def _assessment_row(pair: PairATC) -> dict[str, object]:
    return {
        "source": str(pair.source),
        "target": str(pair.target),
        "atc": pair.atc,
        "atc_left": pair.atc_left,
        "atc_right": pair.atc_right,
        "error": pair.error,
        "computed": pair.computed,
        "modules": dict(pair.counts),
    }


def execute_runnable(ctx: Context, report: TickReport) -> None:
    """Claim approved jobs in batches and execute them until none is left, a stop is asked, or
    the registry or the job database is found unreachable (:mod:`migrator.pipeline.batches`)."""
    report.outcomes.extend(run_batches(ctx))


def _planner(ctx: Context, snapshot: Snapshot, watch: Watch, *, dry_run: bool) -> Planner:
    """A planner that knows which bases earlier passes opened (a full pass opens the broken
    ones again: their artifacts may have been fixed)."""
    with session_scope(ctx.sessions) as session:
        usable, problems = known_bases(session=session)
    return Planner(
        ctx,
        snapshot,
        prefetch=lambda bases: ctx.executor.prefetch(ctx, bases),
        dry_run=dry_run,
        known_usable=frozenset(VersionRef(*key) for key in usable),
        known_problems=(
            {} if watch.mode is Listing.FULL else {VersionRef(*k): p for k, p in problems.items()}
        ),
    )


def _plan(ctx: Context, watch: Watch, report: TickReport, *, dry_run: bool) -> Planner:
    """Read what the pass reads of the registry, resolve duplicates, record the catalog,
    deprecate, and plan (with ``dry_run``, plan only)."""
    snapshot = read_snapshot(ctx, watch)
    duplicates = reconcile_duplicates(ctx, snapshot, dry_run=dry_run)
    report.duplicates = [(str(d.ref), str(d.kept)) for d in duplicates]
    report.problems.extend(snapshot.problems)
    planner = _planner(ctx, snapshot, watch, dry_run=dry_run)
    successions = snapshot.successions(planner.usable)
    if dry_run:
        with session_scope(ctx.sessions) as session:
            _deprecate(ctx, snapshot, planner, successions, report, None)
            proposals = planner.propose(successions, session=session)
            session.rollback()
        report.planned = [_planned(None, p) for p in proposals]
    else:
        with session_scope(ctx.sessions) as session:
            _record_catalog(ctx, snapshot, planner, session)
            _deprecate(ctx, snapshot, planner, successions, report, session)
        with session_scope(ctx.sessions) as session:
            proposals = planner.propose(successions, session=session)
            applied = [(_apply(ctx, p, session), p) for p in proposals]
            report.planned = [_planned(job_id, p) for job_id, p in applied if job_id is not None]
        for p in report.planned:
            ctx.say(f"planned {p.adapter} -> {p.target_base}: {p.decision} ({p.reason})")
    report.bases, report.adapters = len(snapshot.bases), len(snapshot.adapters)
    if not snapshot.complete:
        report.adapters = _known_counts(ctx)[1]
    return planner


def _known_counts(ctx: Context) -> tuple[int, int]:
    with session_scope(ctx.sessions) as session:
        return known_counts(session=session)


def _replan(ctx: Context, planner: Planner | None, report: TickReport) -> Planner | None:
    """Plan again the jobs waiting for approval under other assessment parameters (a setting
    changed since): the bases are read for it only when there are some."""
    current = params_hash(assessment_parameters(ctx.settings))
    with session_scope(ctx.sessions) as session:
        if not stale_pending_jobs(current, session=session):
            return planner
    if planner is None:
        bases = {v.ref: v for v in ctx.registry.list_versions(role=ROLE_BASE)}
        planner = Planner(ctx, Snapshot(bases, {}, complete=False), prefetch=None)
    with session_scope(ctx.sessions) as session:
        report.replanned = planner.replan_stale(session=session)
    for job_id, reason in report.replanned:
        ctx.say(f"job {job_id} {reason}")
    return planner


def run_once(ctx: Context, *, dry_run: bool = False, execute: bool = True) -> TickReport:
    """One pass. With ``dry_run`` nothing is written: not the registry, not the database
    (the factorization cache may still fill: it is a cache)."""
    report = TickReport(dry_run=dry_run)
    ctx.breaker.reset()
    watch = begin_watch(ctx)
    planner = None
    if watch.mode is Listing.NONE:
        report.bases, report.adapters = _known_counts(ctx)
    else:
        planner = _plan(ctx, watch, report, dry_run=dry_run)
    report.listing = watch.mode.value
    if not dry_run:
        save_watch(ctx, watch, planner.snapshot if planner is not None else None)
        planner = _replan(ctx, planner, report)
        report.alias_approvals = approve_by_alias(ctx)
    if planner is not None:
        report.assessments = [_assessment_row(pair) for pair in planner.pairs]
        report.problems.extend(planner.base_problems)
    if execute and not dry_run:
        execute_runnable(ctx, report)
    report.unavailable = ctx.breaker.reason
    if report.unavailable:
        log.error(
            "pass ended early: %s; no job spent an attempt on it, the next pass resumes",
            report.unavailable,
        )
    if not dry_run and not report.unavailable:
        snapshot = planner.snapshot if planner is not None else None
        report.problems.extend(publish_pages(ctx, watch, snapshot, report.deprecated))
    for problem in report.problems:
        log.warning("registry content: %s", problem)
    return report


def _planned(job_id: int | None, p: Proposal) -> PlannedJob:
    return PlannedJob(
        job_id=job_id,
        adapter=str(p.adapter.ref),
        lineage=p.lineage,
        source_base=str(p.source_base),
        target_base=str(p.target),
        atc=p.pair.atc,
        decision=p.decision.value,
        reason=p.reason,
    )
