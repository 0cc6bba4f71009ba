"""What the watcher remembers between passes: how far it has read the registry (a cursor per
registry), the versions webhook deliveries marked as changed, and what the catalog already
knows (recorded versions, bases found usable or not), so that a pass reads and writes only
what is new.

Cursors are shared by every replica on the job database: a save keeps the furthest point of
the stored one and the new one (the row is locked on PostgreSQL; SQLite transactions are
serialised), so two passes that read the same changes leave the cursor where the later of
them got.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import datetime

from sqlalchemy import delete, func, or_, select, tuple_
from sqlalchemy.orm import Session, joinedload

from db.enums import BaseStatus
from db.idempotent import insert_or_get
from db.models import AdapterVersion, BaseModelVersion, RegistryCursor, RegistryMark, TransferJob
from db.timestamps import utcnow

__all__ = [
    "changed_jobs",
    "clear_marks",
    "count_pass",
    "get_cursor",
    "jobs_touching",
    "known_bases",
    "known_counts",
    "mark_version",
    "marked_versions",
    "recorded_adapters",
    "save_listing",
    "save_published",
]


def get_cursor(registry: str, *, session: Session) -> RegistryCursor | None:
    """The cursor of ``registry`` (a digest of its URI), or None before the first pass."""
    return session.scalars(
        select(RegistryCursor).where(RegistryCursor.registry_key == registry)
    ).one_or_none()


def _locked_cursor(registry: str, *, session: Session) -> RegistryCursor:
    row, _ = insert_or_get(
        RegistryCursor,
        {"registry_key": registry},
        lambda: RegistryCursor(
            registry_key=registry, listed_ms=0, listed_seen={}, published_seen={}
        ),
        session=session,
    )
    locked = session.scalars(
        select(RegistryCursor)
        .where(RegistryCursor.id == row.id)
        .with_for_update()  # PostgreSQL; SQLite renders none (its transactions are serialised)
        .execution_options(populate_existing=True)
    ).one()
    return locked


def _merged(old: Mapping[str, int], new: Mapping[str, int], floor: int) -> dict[str, int]:
    """Both sets of ``key -> time``, the later time per key, without those before ``floor``."""
    out = {k: v for k, v in old.items() if v >= floor}
    for key, value in new.items():
        if value >= floor and value >= out.get(key, value):
            out[key] = value
    return out


def save_listing(
    registry: str,
    *,
    listed_ms: int,
    seen: Mapping[str, int],
    window_ms: int,
    bases_digest: str | None,
    full: bool,
    session: Session,
) -> RegistryCursor:
    """Record a pass that planned from every version created or updated up to ``listed_ms``.

    Args:
        seen: versions (``name/version`` -> update time) read inside the window before it.
        window_ms: how far before the cursor a late commit is still looked for.
        bases_digest: the fingerprint of the bases the pass saw.
        full: the pass read the whole registry (the count of passes since one restarts).
    """
    row = _locked_cursor(registry, session=session)
    mark = max(row.listed_ms or 0, listed_ms)
    row.listed_seen = _merged(row.listed_seen or {}, seen, mark - window_ms)
    row.listed_ms = mark
    row.bases_digest = bases_digest
    if full:
        row.passes_since_full = 0
        row.full_at = utcnow()
    else:
        row.passes_since_full = (row.passes_since_full or 0) + 1
    session.flush()
    return row


def count_pass(registry: str, *, session: Session) -> None:
    """Count a pass that found nothing new in the registry (toward the next full reconcile)."""
    row = _locked_cursor(registry, session=session)
    row.passes_since_full = (row.passes_since_full or 0) + 1
    session.flush()


def save_published(
    registry: str,
    *,
    published_at: datetime,
    seen: Mapping[str, int],
    window_ms: int,
    session: Session,
) -> None:
    """Record that the pages of every job changed up to ``published_at`` are in step.

    Args:
        seen: jobs (id as text -> their ``updated_at`` in ms) published inside the window.
    """
    row = _locked_cursor(registry, session=session)
    if row.published_at is not None and row.published_at > published_at:
        published_at = row.published_at
    floor = int(published_at.timestamp() * 1000) - window_ms
    row.published_seen = _merged(row.published_seen or {}, seen, floor)
    row.published_at = published_at
    session.flush()


def changed_jobs(since: datetime | None, *, session: Session) -> dict[int, int]:
    """Jobs updated at or after ``since`` (all when None): id -> ``updated_at`` in ms."""
    stmt = select(TransferJob.id, TransferJob.updated_at)
    if since is not None:
        stmt = stmt.where(TransferJob.updated_at >= since)
    return {
        int(job_id): int(updated.timestamp() * 1000) for job_id, updated in session.execute(stmt)
    }


def mark_version(name: str, version: str, event: str, *, session: Session) -> None:
    """Remember that a delivery said ``name/version`` changed (``event``: entity.action)."""
    session.add(RegistryMark(name=name, version=version, event=event[:64]))
    session.flush()


def marked_versions(*, session: Session) -> list[tuple[int, str, str]]:
    """Every mark not handled yet: (id, name, version), oldest first."""
    rows = session.execute(
        select(RegistryMark.id, RegistryMark.name, RegistryMark.version).order_by(RegistryMark.id)
    )
    return [(int(i), str(n), str(v)) for i, n, v in rows]


def clear_marks(ids: Collection[int], *, session: Session) -> None:
    """Delete the marks a pass handled (marks made meanwhile stay)."""
    if ids:
        session.execute(delete(RegistryMark).where(RegistryMark.id.in_(list(ids))))
        session.flush()


def known_bases(*, session: Session) -> tuple[set[tuple[str, str]], dict[tuple[str, str], str]]:
    """Bases whose weights an earlier pass opened: ((name, version) of the usable ones,
    (name, version) -> why it is not usable)."""
    usable: set[tuple[str, str]] = set()
    problems: dict[tuple[str, str], str] = {}
    rows = session.execute(
        select(
            BaseModelVersion.name,
            BaseModelVersion.version,
            BaseModelVersion.weights_digest,
            BaseModelVersion.problem,
        )
    )
    for name, version, digest, problem in rows:
        if digest is not None:
            usable.add((name, version))
        elif problem is not None:
            problems[(name, version)] = problem
    return usable, problems


def recorded_adapters(names: Collection[str] | None, *, session: Session) -> set[tuple[str, str]]:
    """(name, version) of the adapter versions recorded, of the registered models ``names``
    (every one when None)."""
    stmt = select(AdapterVersion.name, AdapterVersion.version)
    found: set[tuple[str, str]] = set()
    if names is None:
        return {(n, v) for n, v in session.execute(stmt)}
    ordered = sorted(names)
    for i in range(0, len(ordered), 500):  # stay under every database's bound-parameter limit
        chunk = stmt.where(AdapterVersion.name.in_(ordered[i : i + 500]))
        found.update((n, v) for n, v in session.execute(chunk))
    return found


def known_counts(*, session: Session) -> tuple[int, int]:
    """(base versions, adapter versions) the catalog holds (bases missing from the registry
    aside)."""
    bases = session.scalar(
        select(func.count())
        .select_from(BaseModelVersion)
        .where(BaseModelVersion.status != BaseStatus.MISSING)
    )
    adapters = session.scalar(select(func.count()).select_from(AdapterVersion))
    return int(bases or 0), int(adapters or 0)


def jobs_touching(
    *,
    session: Session,
    ids: Collection[int] = (),
    names: Collection[str] = (),
    bases: Collection[tuple[str, str]] = (),
) -> list[TransferJob]:
    """The jobs with an id in ``ids``, of an adapter version of a registered model in
    ``names``, or from or to a base (name, version) in ``bases``, oldest first, with their
    adapter version and bases loaded."""
    conditions = []
    if ids:
        conditions.append(TransferJob.id.in_(list(ids)))
    if names:
        of_names = select(AdapterVersion.id).where(AdapterVersion.name.in_(list(names)))
        conditions.append(TransferJob.adapter_version_id.in_(of_names))
    if bases:
        key = tuple_(BaseModelVersion.name, BaseModelVersion.version)
        base_ids = select(BaseModelVersion.id).where(key.in_(list(bases)))
        conditions += [
            TransferJob.source_base_id.in_(base_ids),
            TransferJob.target_base_id.in_(base_ids),
        ]
    if not conditions:
        return []
    stmt = (
        select(TransferJob)
        .where(or_(*conditions))
        .options(
            joinedload(TransferJob.adapter_version),
            joinedload(TransferJob.source_base),
            joinedload(TransferJob.target_base),
        )
        .order_by(TransferJob.id)
    )
    return list(session.scalars(stmt).unique())
