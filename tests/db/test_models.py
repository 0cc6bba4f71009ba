"""Models on both back ends: UTC timestamps, CHECK and foreign key constraints, vocabularies."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session, sessionmaker

from db import (
    AdapterFormat,
    AdapterLayout,
    BaseModelVersion,
    JobStatus,
    TransferJob,
    session_scope,
)
from tests.db.seed import seed_bases, seed_job

UTC_PLUS_2 = timezone(timedelta(hours=2))


def test_timestamps_come_back_aware_utc(factory: sessionmaker[Session]) -> None:
    local = datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=UTC_PLUS_2)
    with session_scope(factory) as session:
        session.add(BaseModelVersion(name="m", version="1", discovered_at=local))
    with session_scope(factory) as session:
        stored = session.scalars(select(BaseModelVersion)).one().discovered_at
    assert stored.tzinfo is not None and stored.utcoffset() == timedelta(0)
    assert stored == local  # the same instant
    assert (stored.hour, stored.microsecond) == (10, 123456)  # expressed in UTC


def test_timestamp_comparisons_in_sql_order_instants(factory: sessionmaker[Session]) -> None:
    # Offsets differ but instants decide: 11:00+02:00 is before 10:00Z.
    with session_scope(factory) as session:
        session.add(
            BaseModelVersion(
                name="m", version="1", discovered_at=datetime(2026, 1, 1, 11, tzinfo=UTC_PLUS_2)
            )
        )
    with session_scope(factory) as session:
        before = session.scalars(
            select(BaseModelVersion).where(
                BaseModelVersion.discovered_at < datetime(2026, 1, 1, 10, tzinfo=UTC)
            )
        ).all()
        after = session.scalars(
            select(BaseModelVersion).where(
                BaseModelVersion.discovered_at < datetime(2026, 1, 1, 8, tzinfo=UTC)
            )
        ).all()
    assert [b.version for b in before] == ["1"]
    assert after == []


def test_naive_datetimes_are_refused(factory: sessionmaker[Session]) -> None:
    with pytest.raises(StatementError, match="naive datetime"), session_scope(factory) as session:
        session.add(BaseModelVersion(name="m", version="1", discovered_at=datetime(2026, 1, 1)))
        session.flush()


def test_status_check_constraint(factory: sessionmaker[Session]) -> None:
    with session_scope(factory) as session:
        job_id = seed_job(session, seed_bases(session), "a").id
    with pytest.raises(IntegrityError), session_scope(factory) as session:
        session.execute(
            text("UPDATE transfer_jobs SET status = 'exploded' WHERE id = :id"), {"id": job_id}
        )
    with session_scope(factory) as session:
        assert session.get(TransferJob, job_id).status is JobStatus.APPROVED  # type: ignore[union-attr]


def test_foreign_keys_are_enforced(factory: sessionmaker[Session]) -> None:
    with pytest.raises(IntegrityError), session_scope(factory) as session:
        session.add(TransferJob(adapter_version_id=999, target_base_id=998, source_base_id=997))
        session.flush()


def test_vocabularies_match_core() -> None:
    from core.adapter import AdapterKind
    from core.adapter import AdapterLayout as CoreLayout

    assert [m.value for m in AdapterFormat] == [m.value for m in AdapterKind]
    assert [m.value for m in AdapterLayout] == [m.value for m in CoreLayout]
