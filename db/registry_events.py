"""The job database's side of repairing the registry: an audit row for each version the
reconciler marked as a duplicate, and the job and lineage rows pointed at the version kept."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from db.catalog import find_adapter_version, get_or_create_adapter_version
from db.enums import AdapterOrigin, RegistryAction
from db.lineage import record_lineage
from db.models import AdapterVersion, Lineage, RegistryEvent, TransferJob
from db.timestamps import utcnow

__all__ = ["duplicate_events", "record_duplicate"]


def _find_event(name: str, version: str, *, session: Session) -> RegistryEvent | None:
    return session.scalars(
        select(RegistryEvent).where(
            RegistryEvent.action == RegistryAction.DUPLICATE_MARKED,
            RegistryEvent.name == name,
            RegistryEvent.version == version,
        )
    ).first()


def _kept_row(
    name: str, kept: str, duplicate: AdapterVersion | None, session: Session
) -> AdapterVersion | None:
    row = find_adapter_version(name, kept, session=session)
    if row is None and duplicate is not None:
        row = get_or_create_adapter_version(
            name,
            kept,
            base=duplicate.base,
            format=duplicate.format,
            layout=duplicate.layout,
            rank=duplicate.rank,
            origin=AdapterOrigin.TRANSFERRED,
            session=session,
        )
    if row is not None:
        row.origin = AdapterOrigin.TRANSFERRED  # it carries lorax.transferred_from
    return row


def _move_lineage(duplicate: AdapterVersion, kept: AdapterVersion, session: Session) -> None:
    edges = session.scalars(select(Lineage).where(Lineage.child_id == duplicate.id)).all()
    for edge in edges:
        record_lineage(edge.parent_id, kept.id, job_id=edge.job_id, session=session)
    session.execute(delete(Lineage).where(Lineage.child_id == duplicate.id))


def _unreferenced(row: AdapterVersion, session: Session) -> bool:
    uses = session.scalar(
        select(func.count())
        .select_from(TransferJob)
        .where(
            (TransferJob.adapter_version_id == row.id)
            | (TransferJob.result_adapter_version_id == row.id)
        )
    )
    parents = session.scalar(
        select(func.count()).select_from(Lineage).where(Lineage.parent_id == row.id)
    )
    return not uses and not parents


def record_duplicate(
    name: str,
    duplicate: str,
    kept: str,
    *,
    actor: str,
    reason: str,
    session: Session,
    job_tag: str | None = None,
) -> RegistryEvent:
    """Record that version ``duplicate`` of ``name`` doubles version ``kept``, and point this
    database at the kept one: jobs whose result was the duplicate, its lineage edge, and its
    catalog row (deleted when nothing else refers to it). Idempotent: a second call for the
    same duplicate returns the first audit row.

    Returns:
        The audit row (``job_id``: the job of this database whose result moved, if any).
    """
    existing = _find_event(name, duplicate, session=session)
    if existing is not None:
        return existing
    dup_row = find_adapter_version(name, duplicate, session=session)
    kept_row = _kept_row(name, kept, dup_row, session)
    moved: Sequence[TransferJob] = session.scalars(
        select(TransferJob).where(TransferJob.result_ref == f"{name}/{duplicate}")
    ).all()
    for job in moved:
        job.result_ref = f"{name}/{kept}"
        job.result_adapter_version_id = None if kept_row is None else kept_row.id
    session.flush()
    if dup_row is not None and kept_row is not None:
        _move_lineage(dup_row, kept_row, session)
        if _unreferenced(dup_row, session):
            session.delete(dup_row)
    event = RegistryEvent(
        action=RegistryAction.DUPLICATE_MARKED,
        actor=actor,
        name=name,
        version=duplicate,
        kept_version=kept,
        job_tag=job_tag,
        job_id=moved[0].id if moved else None,
        reason=reason,
        at=utcnow(),
    )
    session.add(event)
    session.flush()
    return event


def duplicate_events(*, session: Session) -> Sequence[RegistryEvent]:
    """Every duplicate the reconciler marked, oldest first."""
    return session.scalars(
        select(RegistryEvent)
        .where(RegistryEvent.action == RegistryAction.DUPLICATE_MARKED)
        .order_by(RegistryEvent.id)
    ).all()
