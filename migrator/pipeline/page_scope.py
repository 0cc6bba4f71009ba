"""Which registry pages a pass must bring in step, and what it reads to write them.

After a full read, every page (as every pass did before the watcher read only changes). After
any other pass, only the pages a change can reach: those of the lineages read (their versions
created, updated or marked), of the jobs changed since the last publish (planned, approved in
the CLI or the UI, executed) and of the bases they touch, deprecated in the pass or their
successors. A pass that found nothing new and changed no job publishes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from db import TransferJob, jobs_touching, list_jobs, session_scope
from migrator.pages import Carry
from migrator.pipeline.context import Context
from migrator.pipeline.snapshot import Snapshot, parse_refs, read_lineages
from migrator.pipeline.watch import JobChanges, Listing, Watch
from migrator.registry import VersionRef
from migrator.registry.pages import RegisteredModelInfo, RegistryPages

__all__ = ["PageScope", "carry_of", "page_scope"]


@dataclass(frozen=True)
class PageScope:
    """What one publish writes from.

    Attributes:
        snapshot: every base; every adapter lineage after a full read, else those in scope.
        carries: the jobs the pages in scope show (every job of a lineage in scope).
        models: the registered models in scope, with their tags, descriptions and aliases.
        bases: the bases whose pages may change (None: every base).
    """

    snapshot: Snapshot
    carries: Sequence[Carry]
    models: dict[str, RegisteredModelInfo]
    bases: frozenset[VersionRef] | None


def carry_of(job: TransferJob) -> Carry:
    """A job as the pages show it."""
    return Carry(
        job_id=job.id,
        adapter=VersionRef(job.adapter_version.name, job.adapter_version.version),
        source_base=VersionRef(job.source_base.name, job.source_base.version),
        target=VersionRef(job.target_base.name, job.target_base.version),
        status=job.status.value,
        result=VersionRef.parse(job.result_ref) if job.result_ref else None,
        atc=job.atc,
    )


def _carries(
    ctx: Context,
    *,
    ids: Iterable[int] = (),
    names: Iterable[str] = (),
    bases: Iterable[VersionRef] = (),
) -> list[Carry]:
    with session_scope(ctx.sessions) as session:
        jobs = jobs_touching(
            ids=set(ids),
            names=set(names),
            bases={(b.name, b.version) for b in bases},
            session=session,
        )
        return [carry_of(job) for job in jobs]


def _every_carry(ctx: Context) -> list[Carry]:
    with session_scope(ctx.sessions) as session:
        return [carry_of(job) for job in list_jobs(session=session)]


def _reread(ctx: Context, names: set[str]) -> Snapshot:
    snapshot = read_lineages(ctx.registry, names)
    snapshot.drop_marked_duplicates()
    return snapshot


def _touched_bases(
    snapshot: Snapshot,
    watch: Watch,
    carries: Sequence[Carry],
    deprecated: Sequence[tuple[str, str]],
) -> frozenset[VersionRef]:
    """Bases whose pages a change in scope can reach."""
    found = {e.base for e in snapshot.adapters.values() if e.base is not None}
    found |= {c.source_base for c in carries} | {c.target for c in carries}
    found |= {s.ref for s in watch.fresh if s.ref in snapshot.bases}
    for ref, successors in deprecated:
        found.add(VersionRef.parse(ref))
        found.update(parse_refs(successors)[0])
    return frozenset(found)


def page_scope(
    ctx: Context,
    registry: RegistryPages,
    watch: Watch,
    snapshot: Snapshot | None,
    changes: JobChanges,
    deprecated: Sequence[tuple[str, str]],
) -> PageScope | None:
    """The pages this pass brings in step (None: none can have moved).

    Args:
        snapshot: what the pass read (None when it read nothing).
        changes: the jobs changed since the last publish.
        deprecated: (base, successors) the pass deprecated.
    """
    changed = _carries(ctx, ids=changes.fresh) if changes.fresh else []
    job_names = {c.adapter.name for c in changed} | {c.result.name for c in changed if c.result}
    if watch.mode is Listing.FULL and snapshot is not None:
        full = snapshot.with_lineages(_reread(ctx, job_names)) if job_names else snapshot
        full.drop_marked_duplicates()
        return PageScope(full, _every_carry(ctx), {m.name: m for m in registry.list_models()}, None)
    names = (watch.names if snapshot is not None else set()) | job_names
    if not names and not deprecated:
        return None
    scoped = _reread(ctx, names)
    bases = _touched_bases(scoped, watch, changed, deprecated)
    carries = _carries(ctx, names=names, bases=bases)
    wanted = names | {r.name for r in scoped.bases} | {c.adapter.name for c in carries}
    wanted |= {c.result.name for c in carries if c.result is not None}
    models = {m.name: m for m in registry.find_models(wanted)}
    return PageScope(scoped, carries, models, bases)
