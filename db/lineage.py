"""Lineage of adapter versions: parent -> child edges written by transfer jobs, walked with
recursive CTEs (the same SQL runs on SQLite and PostgreSQL)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Integer, func, literal, select
from sqlalchemy.orm import Session

from db.idempotent import insert_or_get
from db.models import AdapterVersion, Lineage

__all__ = [
    "MAX_LINEAGE_DEPTH",
    "LineageEntry",
    "ancestors",
    "descendants",
    "record_lineage",
]

#: Walks stop this many edges away; a guard, lineages are a few transfers deep.
MAX_LINEAGE_DEPTH = 64


@dataclass(frozen=True)
class LineageEntry:
    """An adapter version ``depth`` edges away (1: direct parent or child)."""

    adapter: AdapterVersion
    depth: int


def record_lineage(
    parent_id: int, child_id: int, *, session: Session, job_id: int | None = None
) -> Lineage:
    """Record ``parent -> child`` once (a second call returns the first edge).

    Raises:
        ValueError: the edge would close a cycle (``child`` is ``parent`` or one of its
            ancestors).
    """
    if parent_id == child_id or any(
        entry.adapter.id == child_id for entry in ancestors(parent_id, session=session)
    ):
        raise ValueError(
            f"lineage {parent_id} -> {child_id} would make adapter version {child_id} its own "
            "ancestor"
        )
    edge, _ = insert_or_get(
        Lineage,
        {"parent_id": parent_id, "child_id": child_id},
        lambda: Lineage(parent_id=parent_id, child_id=child_id, job_id=job_id),
        session=session,
    )
    return edge


def _walk(start_id: int, *, upward: bool, session: Session) -> list[LineageEntry]:
    here, there = (
        (Lineage.child_id, Lineage.parent_id) if upward else (Lineage.parent_id, Lineage.child_id)
    )
    walk = (
        select(there.label("id"), literal(1, Integer).label("depth"))
        .where(here == start_id)
        .cte("walk", recursive=True)
    )
    walk = walk.union_all(
        select(there, walk.c.depth + 1)
        .join(walk, here == walk.c.id)
        .where(walk.c.depth < MAX_LINEAGE_DEPTH)
    )
    # A version reachable along two paths is listed once, at its shortest distance.
    nearest = (
        select(walk.c.id, func.min(walk.c.depth).label("depth")).group_by(walk.c.id).subquery()
    )
    rows = session.execute(
        select(AdapterVersion, nearest.c.depth)
        .join(nearest, AdapterVersion.id == nearest.c.id)
        .order_by(nearest.c.depth, AdapterVersion.id)
    ).all()
    return [LineageEntry(adapter=adapter, depth=int(depth)) for adapter, depth in rows]


def ancestors(adapter_version_id: int, *, session: Session) -> list[LineageEntry]:
    """Every version the given one descends from, nearest first."""
    return _walk(adapter_version_id, upward=True, session=session)


def descendants(adapter_version_id: int, *, session: Session) -> list[LineageEntry]:
    """Every version derived from the given one, nearest first."""
    return _walk(adapter_version_id, upward=False, session=session)
