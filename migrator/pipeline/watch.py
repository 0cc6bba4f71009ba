"""What a pass reads of the registry: everything, what changed since the last pass, or nothing.

A pass that finds nothing new should cost nothing that grows with the registry. Each pass
asks the registry which versions were created or updated since the cursor the job database
keeps (:func:`db.get_cursor`; MLflow's search orders by update time, and the registry's probe
answers without loading MLflow), and reads:

- ``full``: every base and adapter version, on the first pass, every
  ``full_reconcile_every``-th pass, and whenever the bases or the tags that decide succession
  moved (a new base can strand every adapter). A full pass catches what the other reads
  cannot see: MLflow moves no update time when a tag or an alias is set, and a deleted version
  is simply gone;
- ``changes``: every base version (few), and every version of the registered models that
  have a version created, updated or marked by a webhook delivery (``model_version_tag.set``)
  since the cursor;
- ``none``: nothing (the registry was asked one question).

The cursor is the newest update time read, with an overlap window (:data:`OVERLAP_MS`) so
that a version committed late, or stamped by another server's clock, is still caught; the
versions inside the window are remembered so that none is read twice for nothing. Jobs whose
registry pages must follow are found the same way (:func:`changed_job_ids`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from db import (
    changed_jobs,
    clear_marks,
    count_pass,
    get_cursor,
    marked_versions,
    save_listing,
    save_published,
    session_scope,
    utcnow,
)
from migrator.pipeline.context import Context
from migrator.pipeline.snapshot import Snapshot, read_lineages, read_registry
from migrator.registry import ModelVersionInfo, Registry, Tag, VersionRef, VersionStamp

__all__ = [
    "OVERLAP_MS",
    "JobChanges",
    "Listing",
    "Watch",
    "bases_digest",
    "begin_watch",
    "changed_job_ids",
    "read_snapshot",
    "registry_key",
    "save_job_changes",
    "save_watch",
]

#: How far before the cursor a pass looks again: commits that land late, clocks of several
#: registry servers, clocks of the job database's replicas (jobs' update times).
OVERLAP_MS = 60_000


class Listing(StrEnum):
    """What a pass read of the registry."""

    FULL = "full"  # every base and adapter version
    CHANGES = "changes"  # every base; the lineages with a version created, updated or marked
    NONE = "none"  # nothing new: the registry was only asked what changed


@dataclass
class Watch:
    """What one pass reads, and what it needs to move the cursor on."""

    key: str
    mode: Listing
    stamps: list[VersionStamp] = field(default_factory=list)  # every one inside the window
    fresh: list[VersionStamp] = field(default_factory=list)  # those not read before
    marks: list[tuple[int, str, str]] = field(default_factory=list)  # (id, name, version)
    listed_ms: int = 0
    bases_digest: str | None = None

    @property
    def names(self) -> set[str]:
        """The registered models with a version created, updated or marked."""
        return {s.name for s in self.fresh} | {name for _, name, _ in self.marks}


def registry_key(registry: Registry) -> str:
    """The job database's name for a registry (a digest of its URI: no credentials stored).
    A registry living in this process only is named by this process and object."""
    address = registry.address()
    source = address[1] if address else f"in-process:{os.getpid()}:{id(registry)}"
    return hashlib.sha256(source.encode()).hexdigest()


def bases_digest(bases: dict[VersionRef, ModelVersionInfo]) -> str:
    """A fingerprint of the base versions and the tags people set that decide succession
    (``lorax.role``, ``lorax.supersedes``, ``lorax.weights_path``; the deprecation tags are the
    service's own)."""
    h = hashlib.sha256()
    for ref in sorted(bases):
        tags = bases[ref].tags
        fields = (Tag.ROLE, Tag.SUPERSEDES, Tag.WEIGHTS_PATH)
        h.update(f"{ref}|{'|'.join(tags.get(k, '') for k in fields)};".encode())
    return h.hexdigest()


def begin_watch(ctx: Context) -> Watch:
    """What this pass reads: the cursor, the versions changed since it, the marks."""
    key = registry_key(ctx.registry)
    with session_scope(ctx.sessions) as session:
        cursor = get_cursor(key, session=session)
        marks = marked_versions(session=session)
        state = None
        if cursor is not None:
            seen = dict(cursor.listed_seen or {})
            state = (cursor.listed_ms, seen, cursor.passes_since_full, cursor.bases_digest)
    if state is None:  # the first pass on this job database: the cursor starts at the newest
        return Watch(key, Listing.FULL, ctx.registry.changed_since(0), marks=marks)
    listed_ms, seen, passes, digest = state
    stamps = ctx.registry.changed_since(max(0, listed_ms - OVERLAP_MS))
    fresh = [s for s in stamps if seen.get(str(s.ref)) != s.updated_ms]
    if passes + 1 >= ctx.settings.full_reconcile_every:
        mode = Listing.FULL
    else:
        mode = Listing.CHANGES if fresh or marks else Listing.NONE
    return Watch(key, mode, stamps, fresh, marks, listed_ms, digest)


def read_snapshot(ctx: Context, watch: Watch) -> Snapshot:
    """The registry as this pass reads it; a ``changes`` read becomes a full one when the
    bases moved."""
    if watch.mode is Listing.CHANGES:
        snapshot = read_lineages(ctx.registry, watch.names)
        if bases_digest(snapshot.bases) == watch.bases_digest:
            return snapshot
        watch.mode = Listing.FULL
    return read_registry(ctx.registry)


def save_watch(ctx: Context, watch: Watch, snapshot: Snapshot | None) -> None:
    """Move the cursor on past what this pass read (``snapshot``: None when it read nothing)
    and forget the marks it handled."""
    with session_scope(ctx.sessions) as session:
        if snapshot is None:
            count_pass(watch.key, session=session)
            return
        read = [*snapshot.bases.values(), *(e.info for e in snapshot.adapters.values())]
        times = {str(s.ref): s.updated_ms for s in watch.stamps}
        times.update({str(v.ref): v.updated_ms for v in read if v.updated_ms})
        # The registry's answer bounds the cursor: versions read later may be newer, but what
        # changed meanwhile in other lineages was not read.
        mark = max([watch.listed_ms, *(s.updated_ms for s in watch.stamps)])
        save_listing(
            watch.key,
            listed_ms=mark,
            seen=times,
            window_ms=OVERLAP_MS,
            bases_digest=bases_digest(snapshot.bases),
            full=watch.mode is Listing.FULL,
            session=session,
        )
        clear_marks([mark_id for mark_id, _, _ in watch.marks], session=session)


@dataclass(frozen=True)
class JobChanges:
    """Jobs updated since their pages were last published (``fresh``), and what moves the
    publishing cursor on once they are."""

    key: str
    at: datetime
    fresh: frozenset[int]
    times: dict[str, int]


def changed_job_ids(ctx: Context, key: str) -> JobChanges:
    """The jobs whose registry pages may be out of step (every job before the first publish)."""
    now = utcnow()
    with session_scope(ctx.sessions) as session:
        cursor = get_cursor(key, session=session)
        since = cursor.published_at if cursor is not None else None
        seen = dict(cursor.published_seen or {}) if cursor is not None else {}
        found = changed_jobs(
            since - timedelta(milliseconds=OVERLAP_MS) if since else None, session=session
        )
    fresh = frozenset(job_id for job_id, ms in found.items() if seen.get(str(job_id)) != ms)
    return JobChanges(key, now, fresh, {str(k): v for k, v in found.items()})


def save_job_changes(ctx: Context, changes: JobChanges) -> None:
    """Record that the pages of ``changes`` are published."""
    with session_scope(ctx.sessions) as session:
        save_published(
            changes.key,
            published_at=changes.at,
            seen=changes.times,
            window_ms=OVERLAP_MS,
            session=session,
        )
