"""UTC-aware timestamps that survive a round trip through SQLite and PostgreSQL alike.

PostgreSQL stores ``timestamptz`` and hands back aware datetimes; SQLite has no date type and
SQLAlchemy stores naive ISO strings. :class:`UTCDateTime` makes both behave the same: it refuses
naive datetimes on the way in (a naive value has no defined instant), stores UTC, and always
returns an aware datetime in UTC. On SQLite every value is stored in the same UTC text format, so
comparisons in SQL (``lease_expires_at <= :now``) order correctly.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

__all__ = ["UTCDateTime", "utcnow"]


def utcnow() -> datetime:
    """The current instant as an aware UTC datetime."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A ``DateTime(timezone=True)`` column that only accepts and returns aware UTC datetimes.

    Raises:
        ValueError: when a naive datetime is bound.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware datetime (UTC)")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            # SQLite keeps text; one offset-free UTC format keeps SQL comparisons correct.
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)
