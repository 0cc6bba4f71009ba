"""The reconciler: every pass resolves transferred versions that double one another.

Two versions of one adapter lineage transferred from the same source version to the same
target base (``lorax.transferred_from`` and ``lorax.base`` equal, both made by a job:
``lorax.job``) are one transfer registered twice: a registry that committed a create and lost
its reply to a client that re-sent it, or two job databases sharing the registry. The oldest
is kept; every other one is tagged ``lorax.duplicate_of=<name/version kept>`` and left in
place (its artifacts are the same transfer; an operator may delete it), an audit row is written
(``registry_events``), and the job database is pointed at the kept version (the job's result,
its lineage edge). The service ignores tagged versions from then on: they are never planned
from, never found as a job's registered version.

The job database row comes first, then the tag: a crash in between redoes the tag on the next
pass, and the audit row is written once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from db import record_duplicate, session_scope
from migrator.pipeline.context import Context
from migrator.pipeline.snapshot import AdapterEntry, Snapshot
from migrator.registry import TRANSFER_IDENTITY, Tag, VersionRef

__all__ = ["Duplicate", "find_duplicates", "reconcile_duplicates"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Duplicate:
    """A version that doubles ``kept``."""

    ref: VersionRef
    kept: VersionRef
    job_tag: str


def _number(entry: AdapterEntry) -> int:
    version = entry.ref.version
    return int(version) if version.isdigit() else 0


def find_duplicates(snapshot: Snapshot) -> list[Duplicate]:
    """The versions of the snapshot that double an older one (untagged so far)."""
    groups: dict[tuple[str, ...], list[AdapterEntry]] = {}
    for entry in snapshot.adapters.values():
        tags = entry.info.tags
        if Tag.JOB not in tags or Tag.DUPLICATE_OF in tags:
            continue
        if not all(tags.get(k) for k in TRANSFER_IDENTITY):
            continue
        key = (entry.ref.name, *(tags[k] for k in TRANSFER_IDENTITY))
        groups.setdefault(key, []).append(entry)
    found: list[Duplicate] = []
    for entries in groups.values():
        entries.sort(key=_number)
        kept = entries[0]
        found += [Duplicate(e.ref, kept.ref, e.info.tags[Tag.JOB]) for e in entries[1:]]
    return sorted(found, key=lambda d: d.ref)


def reconcile_duplicates(ctx: Context, snapshot: Snapshot, *, dry_run: bool) -> list[Duplicate]:
    """Resolve the snapshot's duplicates (not in a dry run) and drop every duplicate, tagged
    before or found now, from the snapshot.

    Raises:
        RegistryUnavailableError: the registry went away while tagging (the pass ends; the
            next one finishes the work).
    """
    found = find_duplicates(snapshot)
    for dup in found:
        if dry_run:
            continue
        reason = (
            f"{dup.ref} doubles {dup.kept}: transferred from the same source to the same "
            f"target (lorax.job={dup.job_tag}); the oldest is kept"
        )
        with session_scope(ctx.sessions) as session:
            record_duplicate(
                dup.ref.name,
                dup.ref.version,
                dup.kept.version,
                actor=ctx.settings.worker_id,
                reason=reason,
                job_tag=dup.job_tag,
                session=session,
            )
        ctx.registry.set_tags(dup.ref, {Tag.DUPLICATE_OF: str(dup.kept)})
        log.warning("registry: %s; tagged %s=%s", reason, Tag.DUPLICATE_OF, dup.kept)
    doubles = {d.ref for d in found} | {
        ref for ref, entry in snapshot.adapters.items() if Tag.DUPLICATE_OF in entry.info.tags
    }
    for ref in doubles:
        del snapshot.adapters[ref]
    return found
